"""An ordinary PyTorch training script on fastopt: the only change is the optimizer's import.

Trains a small MLP on scikit-learn's 8x8 handwritten digits with AdamW, a OneCycleLR scheduler and a
checkpoint half-way (saved, then loaded into a fresh optimizer as a resumed job would), and prints the test
accuracy. Run it with ``--torch`` to get torch.optim's AdamW instead: the numbers agree to float rounding.

    python examples/torch_digits.py            # fastopt.torch.AdamW
    python examples/torch_digits.py --torch    # torch.optim.AdamW
"""
import argparse
import io

import torch
from sklearn.datasets import load_digits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", action="store_true", help="use torch.optim.AdamW instead of fastopt.torch.AdamW")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    if args.torch:
        from torch.optim import AdamW
    else:
        from fastopt.torch import AdamW  # the one-line change

    digits = load_digits()
    inputs = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    targets = torch.tensor(digits.target)
    train_x, train_y, test_x, test_y = inputs[:1500], targets[:1500], inputs[1500:], targets[1500:]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    batch, steps_per_epoch = 50, 1500 // 50
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2,
                                                    total_steps=args.epochs * steps_per_epoch)
    for epoch in range(args.epochs):
        order = torch.randperm(1500)
        for first in range(0, 1500, batch):
            rows = order[first:first + batch]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(train_x[rows]), train_y[rows])
            loss.backward()
            optimizer.step()
            scheduler.step()
        if epoch == args.epochs // 2:  # checkpoint, and resume from it as a restarted job would
            buffer = io.BytesIO()
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
            buffer.seek(0)
            checkpoint = torch.load(buffer, weights_only=True)
            optimizer = AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2,
                                                            total_steps=args.epochs * steps_per_epoch)
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            state = optimizer.state[model[0].weight]
            print(f"checkpoint after epoch {epoch}: {buffer.getbuffer().nbytes / 1e3:.0f} kB, resumed into a fresh "
                  f"{type(optimizer).__name__} at step {int(state['step'])} with lr {scheduler.get_last_lr()[0]:.2e}")
        print(f"epoch {epoch:2d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    print(f"{type(optimizer).__module__}.{type(optimizer).__name__}: test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
