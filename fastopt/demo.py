"""A small real model for ``fastopt demo`` and ``fastopt lr-find``: a one-hidden-layer MLP on scikit-learn's
bundled 8x8 digits (1,797 images, no download), written in NumPy with hand-written backprop.

    data = load_digits_split()
    model = MLP(hidden=128)
    loss, grads = model.loss_and_grads(data.x_train[:64], data.y_train[:64])

Needs scikit-learn (``pip install scikit-learn``), imported only when the data are loaded.
"""
import contextlib
import time
from dataclasses import dataclass

import numpy as np

from . import rules, schedules

OPTIMIZERS = {cls.__name__.lower(): cls for cls in rules.OPTIMIZERS}
SCHEDULES = ("onecycle", "cosine", "warmup_cosine", "step", "constant")
# Peak rates that train this model well; SGD uses Nesterov momentum 0.9.
DEFAULT_LR = {"adamw": 3e-3, "adam": 3e-3, "sgd": 0.1, "rmsprop": 1e-3, "adagrad": 3e-2, "lion": 1e-3,
              "adamwschedulefree": 3e-3, "sgdschedulefree": 0.3, "lamb": 1e-2}
# The schedule-free optimizers take no decay schedule: a constant rate, warmed up over this share of the steps.
SCHEDULE_FREE_WARMUP = 0.05


@dataclass
class Digits:
    x_train: np.ndarray  # float32 [n, 64], pixels scaled to [0, 1]
    y_train: np.ndarray  # int64 [n]
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(test_fraction=0.2, seed=0):
    """scikit-learn's digits, shuffled with ``seed`` and split into train and test sets."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the demo needs scikit-learn: pip install scikit-learn") from error
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    test = int(round(test_fraction * len(y)))
    return Digits(x[order[test:]], y[order[test:]], x[order[:test]], y[order[:test]])


class MLP:
    """``logits = relu(x W1 + b1) W2 + b2`` with softmax cross-entropy; float32 params in ``self.params`` (the
    arrays the optimizer updates in place) and the matching gradient arrays in ``self.grads``."""

    def __init__(self, inputs=64, hidden=128, classes=10, seed=0):
        rng = np.random.default_rng(seed)
        # He initialisation for the ReLU layer, Glorot-sized for the output layer.
        w1 = rng.standard_normal((inputs, hidden)) * np.sqrt(2.0 / inputs)
        w2 = rng.standard_normal((hidden, classes)) * np.sqrt(1.0 / hidden)
        self.params = [w1.astype(np.float32), np.zeros(hidden, np.float32),
                       w2.astype(np.float32), np.zeros(classes, np.float32)]
        self.grads = [np.zeros_like(param) for param in self.params]

    def logits(self, x):
        w1, b1, w2, b2 = self.params
        return np.maximum(x @ w1 + b1, 0.0) @ w2 + b2

    def loss_and_grads(self, x, y):
        """Mean cross-entropy over the batch; fills ``self.grads`` and returns ``(loss, self.grads)``."""
        w1, b1, w2, b2 = self.params
        hidden = np.maximum(x @ w1 + b1, 0.0)
        logits = hidden @ w2 + b2
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(len(y))
        loss = -float(log_probs[rows, y].mean())
        # d loss / d logits = (softmax - one_hot) / batch
        d_logits = np.exp(log_probs)
        d_logits[rows, y] -= 1.0
        d_logits /= len(y)
        d_hidden = (d_logits @ w2.T) * (hidden > 0)
        grad_w1, grad_b1, grad_w2, grad_b2 = self.grads
        np.matmul(x.T, d_hidden, out=grad_w1)
        grad_b1[...] = d_hidden.sum(axis=0)
        np.matmul(hidden.T, d_logits, out=grad_w2)
        grad_b2[...] = d_logits.sum(axis=0)
        return loss, self.grads

    def evaluate(self, x, y):
        """(mean cross-entropy, accuracy) without touching the grads."""
        logits = self.logits(x)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -float(log_probs[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())


def make_schedule(name, lr, total_steps):
    """The demo's schedules, all peaking at ``lr``."""
    if name == "onecycle":
        return schedules.onecycle(max_lr=lr, total_steps=total_steps)
    if name == "cosine":
        return schedules.cosine(lr, t_max=total_steps)
    if name == "warmup_cosine":
        return schedules.warmup(schedules.cosine(lr, t_max=total_steps), warmup_steps=max(1, total_steps // 10))
    if name == "step":
        return schedules.step_decay(lr, step_size=max(1, total_steps // 3), gamma=0.1)
    if name == "constant":
        return schedules.constant(lr)
    raise ValueError(f"unknown schedule {name!r}; choose from {SCHEDULES}")


def make_optimizer(name, params, lr, **extra):
    """``name`` (a key of OPTIMIZERS: adamw, adam, sgd, ...) over ``params`` with ``lr`` (a number or a schedule)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    if name == "sgd":
        extra = {"momentum": 0.9, "nesterov": True, **extra}
    return OPTIMIZERS[name](params, lr=lr, **extra)


def is_schedule_free(name):
    return issubclass(OPTIMIZERS[name], rules.schedule_free.ScheduleFree)


@contextlib.contextmanager
def evaluating(optimizer):
    """The params at the point to evaluate while the block runs: a schedule-free optimizer's average (``eval()``, then
    ``train()``); other optimizers' params as they are."""
    if not hasattr(optimizer, "eval"):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


@contextlib.contextmanager
def thread_limits(optimizer_threads=None):
    """Run the model's matmuls on one BLAS thread, and the optimizer on ``optimizer_threads`` Numba threads
    (None: Numba's default, all cores). The matmuls are tiny (64x128), so BLAS threads gain nothing, and after
    each matmul they spin on the cores the optimizer's parallel kernel is about to use: on a 2-core machine
    that made each ``optimizer.step`` 10x slower. threadpoolctl comes with scikit-learn."""
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        except ImportError:
            pass
        if optimizer_threads:
            import numba

            previous = numba.get_num_threads()
            numba.set_num_threads(optimizer_threads)
            stack.callback(numba.set_num_threads, previous)
        yield


def batches(count, batch_size, rng):
    """Shuffled index batches covering ``range(count)`` once (the last one may be short)."""
    order = rng.permutation(count)
    return [order[start:start + batch_size] for start in range(0, count, batch_size)]


def train(optimizer_name="adamw", schedule_name=None, lr=None, epochs=20, batch_size=64, hidden=128,
          seed=0, log=print, guard=None, threads=None):
    """Train the MLP and return a dict with the per-epoch history, the final test accuracy, the seconds spent in
    ``optimizer.step`` (``first_step_seconds``, which loads or compiles the kernel, and ``step_seconds``, all the
    others) and ``total_seconds`` for the whole run. ``schedule_name`` None: onecycle, or for a schedule-free
    optimizer a constant rate warmed up over the first ``SCHEDULE_FREE_WARMUP`` of the steps (it refuses decay
    schedules). ``log`` gets one line per epoch (None: silent); ``threads`` is the optimizer's Numba thread count
    (None: all cores)."""
    data = load_digits_split(seed=seed)
    model = MLP(hidden=hidden, seed=seed)
    lr = DEFAULT_LR[optimizer_name] if lr is None else lr
    steps_per_epoch = -(-len(data.y_train) // batch_size)
    extra = {}
    if is_schedule_free(optimizer_name):
        extra["warmup_steps"] = int(SCHEDULE_FREE_WARMUP * epochs * steps_per_epoch)
    if schedule_name is None:
        schedule_name = "constant" if is_schedule_free(optimizer_name) else "onecycle"
    schedule = make_schedule(schedule_name, lr, epochs * steps_per_epoch)
    optimizer = make_optimizer(optimizer_name, model.params, schedule, guard=guard, **extra)
    rng = np.random.default_rng(seed + 1)
    history, step_times = [], []
    start = time.perf_counter()
    with thread_limits(threads):
        for epoch in range(1, epochs + 1):
            losses = []
            for batch in batches(len(data.y_train), batch_size, rng):
                loss, grads = model.loss_and_grads(data.x_train[batch], data.y_train[batch])
                losses.append(loss)
                before = time.perf_counter()
                optimizer.step(grads)
                step_times.append(time.perf_counter() - before)
            with evaluating(optimizer):
                test_loss, test_accuracy = model.evaluate(data.x_test, data.y_test)
                _, train_accuracy = model.evaluate(data.x_train, data.y_train)
            entry = dict(epoch=epoch, train_loss=float(np.mean(losses)), train_accuracy=train_accuracy,
                         test_loss=test_loss, test_accuracy=test_accuracy, lr=optimizer.current_lr()[0])
            history.append(entry)
            if log:
                log(f"epoch {epoch:3d}  lr {entry['lr']:.2e}  train loss {entry['train_loss']:.4f}  "
                    f"train acc {train_accuracy:.3f}  test loss {test_loss:.4f}  test acc {test_accuracy:.3f}")
    total_seconds = time.perf_counter() - start
    return dict(history=history, test_accuracy=history[-1]["test_accuracy"], first_step_seconds=step_times[0],
                step_seconds=sum(step_times[1:]), total_seconds=total_seconds, steps=optimizer.step_count,
                optimizer=optimizer, schedule=schedule_name)


def range_test(optimizer_name="adamw", start_lr=1e-6, end_lr=10.0, num_steps=100, mode="exp", batch_size=64,
               hidden=128, seed=0, threads=None):
    """``fastopt.lr_find`` on a fresh MLP with a new random training batch per step; returns the result."""
    from .lr_finder import lr_find

    data = load_digits_split(seed=seed)
    model = MLP(hidden=hidden, seed=seed)
    optimizer = make_optimizer(optimizer_name, model.params, DEFAULT_LR[optimizer_name])
    rng = np.random.default_rng(seed + 1)

    def step_fn():
        batch = rng.integers(0, len(data.y_train), batch_size)
        return model.loss_and_grads(data.x_train[batch], data.y_train[batch])

    with thread_limits(threads):
        return lr_find(optimizer, step_fn, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, mode=mode)
