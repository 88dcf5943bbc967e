"""fastopt.lr_sweep: every copy bit for bit as its run alone (NumPy per copy and stacked, torch through vmap), a
diverging copy stopped and reported while the others finish, bad input, and the lr-sweep command."""
import numpy as np
import pytest

import fastopt as fo
from fastopt import cli, demo, lr_sweeper

STEPS = 20
RNG = np.random.default_rng(0)
X = RNG.random((256, 8), dtype=np.float32)
Y = RNG.integers(0, 3, 256)
BATCHES = RNG.integers(0, 256, (STEPS, 32))

OPTIMIZERS = [  # (class, options): every rule, awkward options on
    (fo.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-4)),
    (fo.RMSprop, dict(momentum=0.5, centered=True)),
    (fo.Adam, dict(amsgrad=True)),
    (fo.AdamW, dict()),
    (fo.Adagrad, dict(lr_decay=0.01)),
    (fo.Lion, dict(weight_decay=0.1)),
    (fo.LAMB, dict(max_trust_ratio=5.0)),  # per-tensor norms: each copy's tensors are its own
    (fo.AdamW, dict(state_dtype="8bit", min_8bit_size=64)),  # blocks and threshold per tensor: likewise
]
# Plain rates and a schedule: a schedule runs on the optimizer's step count, as in a run alone.
RATES = [1e-3, fo.schedules.warmup(fo.schedules.cosine(3e-2, t_max=STEPS), warmup_steps=5), 1e-1]


def make_mlp():
    return demo.MLP(inputs=8, hidden=16, classes=3, seed=0)


def copy_step(model, step):
    return model.loss_and_grads(X[BATCHES[step]], Y[BATCHES[step]])


def stacked_step(params, grads, step):
    return lr_sweeper.mlp_losses_and_grads(params, grads, X[BATCHES[step]], Y[BATCHES[step]])[0]


def run_alone(optimizer_class, lr, options, steps):
    """The copy's run alone: the plain training loop."""
    model = make_mlp()
    optimizer = optimizer_class(model.params, lr=lr, **options)
    losses = []
    for step in range(steps):
        loss, grads = copy_step(model, step)
        optimizer.step(grads)
        losses.append(loss)
    return np.array(losses), model.params


def assert_as_alone(result, number, optimizer_class, options, steps):
    losses, params = run_alone(optimizer_class, result.lrs[number], options, steps)
    assert result.losses[number, :steps].tobytes() == losses.tobytes(), f"copy {number}: losses"
    for index, (actual, expected) in enumerate(zip(result.models[number].params, params)):
        assert actual.dtype == expected.dtype and actual.tobytes() == expected.tobytes(), f"copy {number} param {index}"


@pytest.mark.parametrize("vectorized", [False, True], ids=["per_copy", "stacked"])
@pytest.mark.parametrize("optimizer_class, options", OPTIMIZERS,
                         ids=[cls.__name__ + ("-8bit" if "state_dtype" in options else "") for cls, options in OPTIMIZERS])
def test_each_copy_steps_as_it_would_alone(optimizer_class, options, vectorized):
    result = fo.lr_sweep(make_mlp, stacked_step if vectorized else copy_step, RATES, STEPS, optimizer_class,
                         vectorized=vectorized, diverge_factor=None, **options)
    assert (result.diverged_step == -1).all() and result.diverged == [] and result.stop_reasons == [None] * 3
    for number in range(len(RATES)):
        assert_as_alone(result, number, optimizer_class, options, STEPS)
    assert result.best_index == int(np.argmin(result.final_losses)) and result.best_lr is RATES[result.best_index]
    assert list(result.peak_lrs) == [1e-3, RATES[1](np.arange(STEPS)).max(), 1e-1]
    np.testing.assert_array_equal(result.final_losses, result.losses[:, -2:].mean(axis=1))  # last tenth: 2 steps


@pytest.mark.parametrize("vectorized", [False, True], ids=["per_copy", "stacked"])
def test_an_absurd_rate_diverges_and_the_others_finish(vectorized):
    lrs = [1e-2, 1e4, 1e-1]
    result = fo.lr_sweep(make_mlp, stacked_step if vectorized else copy_step, lrs, STEPS, "SGD",
                         vectorized=vectorized)
    assert result.diverged == [1e4] and list(result.diverged_step) == [-1, 1, -1]
    assert "4 x its first loss at step 1" in result.stop_reasons[1]
    assert np.isnan(result.losses[1, 2:]).all() and result.final_losses[1] == np.inf
    assert result.final_losses[result.best_index] == result.final_losses[[0, 2]].min()
    for number in (0, 2):
        assert_as_alone(result, number, fo.SGD, {}, STEPS)
    assert_as_alone(result, 1, fo.SGD, {}, 1)  # its step 1 was not applied: the weights after step 0


def test_nonfinite_grads_stop_a_copy_through_the_guard():
    """A finite loss with NaN grads: the optimizer's Guard skips the step, the sweep takes it again without that
    copy. Toy model: p <- p (1 - 2 lr) on sum(p^2), whose grads turn NaN once |p| >= 100."""
    def step_fn(model, step):
        param = model[0]
        grad = 2 * param if np.abs(param).max() < 100 else np.full_like(param, np.nan)
        return float(np.tanh(np.sum(param * param))), [grad]

    result = fo.lr_sweep(lambda: [np.ones(5, np.float32)], step_fn, [0.1, 10.0], 6, "sgd", diverge_factor=None)
    assert result.diverged == [10.0] and list(result.diverged_step) == [-1, 2]
    assert result.stop_reasons[1] == "the grads held NaN/inf at step 2"
    np.testing.assert_array_equal(result.models[1][0], np.full(5, 361.0, np.float32))  # 1 -> -19 -> 361, then kept
    alone = [np.ones(5, np.float32)]
    optimizer = fo.SGD(alone, lr=0.1)
    for step in range(6):
        optimizer.step(step_fn(alone, step)[1])
    assert result.models[0][0].tobytes() == alone[0].tobytes() and result.best_lr == 0.1


@pytest.mark.parametrize("name", ["AdamW", "LAMB"])  # LAMB: each copy's params stepped as separate tensors
def test_torch_copies_step_as_they_would_alone(name):
    torch = pytest.importorskip("torch")
    ft = pytest.importorskip("fastopt.torch")

    inputs, targets, batches = torch.from_numpy(X), torch.from_numpy(Y), torch.from_numpy(BATCHES)

    def make_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def step_fn(model, step):
        return torch.nn.functional.cross_entropy(model(inputs[batches[step]]), targets[batches[step]])

    lrs = [1e-3, fo.schedules.cosine(3e-2, t_max=STEPS), 1e3]
    result = fo.lr_sweep(make_model, step_fn, lrs, STEPS, name.lower(), weight_decay=0.05)
    assert result.diverged == [1e3] and result.diverged_step[2] >= 1
    for number, steps in ((0, STEPS), (1, STEPS), (2, int(result.diverged_step[2]))):
        model = make_model()
        optimizer = getattr(ft, name)(model.parameters(), lr=lrs[number], weight_decay=0.05)
        losses = []
        for step in range(steps):
            optimizer.zero_grad()
            loss = step_fn(model, step)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        for actual, expected in zip(result.models[number].parameters(), model.parameters()):
            assert torch.equal(actual, expected), f"copy {number}"
        # vmap's nll_loss sums the batch in another order: the loss may differ in its last bit, never the params.
        np.testing.assert_allclose(result.losses[number, :steps], losses, rtol=1e-6)
    weight = result.models[0][0].weight
    assert weight.data_ptr() != result.models[1][0].weight.data_ptr() and weight.is_contiguous()


# ---------------------------------------------------------------- bad input
def three_grads(model, step):
    loss, grads = copy_step(model, step)
    return loss, grads[:3]


@pytest.mark.parametrize("arguments, error, message", [
    (dict(lrs=[]), ValueError, "lrs is empty"),
    (dict(lrs=[1e-3, 0.0]), ValueError, "lrs[1] is 0.0"),
    (dict(lrs=[-1e-3]), ValueError, "finite number > 0"),
    (dict(lrs=[float("nan")]), ValueError, "finite number > 0"),
    (dict(lrs=0.1), TypeError, "must be a list of learning rates"),
    (dict(steps=0), ValueError, "steps must be an int >= 1"),
    (dict(optimizer="nope"), ValueError, "unknown optimizer 'nope'"),
    (dict(lr=0.1), ValueError, "leave lr out"),
    (dict(guard=fo.Guard()), ValueError, "leave guard out"),
    (dict(max_grad_norm=1.0), ValueError, "norm over all copies"),
    (dict(diverge_factor=0), ValueError, "diverge_factor"),
    (dict(step_fn=three_grads), ValueError, "step_fn returned 3 grads for copy 0, whose model has 4 params"),
    (dict(step_fn=lambda params, grads, step: (np.zeros(2), grads), vectorized=True), TypeError,
     "returns only the losses"),
    (dict(step_fn=lambda params, grads, step: np.zeros(3), vectorized=True), ValueError, "shape (2,)"),
    (dict(make_model=lambda: "model"), TypeError, "make_model() must return"),
    (dict(max_bytes=1000), MemoryError, "2 copies need about"),
])
def test_bad_input(arguments, error, message):
    call = dict(make_model=make_mlp, step_fn=copy_step, lrs=[1e-3, 1e-2], steps=3, optimizer="adamw")
    call.update(arguments)
    with pytest.raises(error) as raised:
        fo.lr_sweep(call.pop("make_model"), call.pop("step_fn"), call.pop("lrs"), call.pop("steps"),
                    call.pop("optimizer"), **call)
    assert message in str(raised.value)


def test_too_many_copies_are_refused_before_they_are_made():
    made = []

    def make_model():
        made.append(1)
        return [np.zeros(10_000_000, np.float32)]  # 40 MB, untouched (calloc): no memory used yet

    with pytest.raises(MemoryError, match=r"100000 copies need about 1.49e\+04 GiB \(4 x 40,000,000 bytes per copy: "
                                          r"params, grads and 2 state buffers of AdamW\), more than the .* available"):
        fo.lr_sweep(make_model, copy_step, np.geomspace(1e-4, 1, 100_000), 10, "adamw")
    assert len(made) == 1


def test_torch_bad_input():
    torch = pytest.importorskip("torch")

    def make_model():
        return torch.nn.Linear(2, 1)

    with pytest.raises(ValueError, match="vectorized=True is for NumPy models"):
        fo.lr_sweep(make_model, None, [1e-3], 2, vectorized=True)
    with pytest.raises(TypeError, match="a fastopt.torch optimizer class"):
        fo.lr_sweep(make_model, None, [1e-3], 2, torch.optim.AdamW)


# ---------------------------------------------------------------- the command
def test_command_tiny(tmp_path, capsys):
    assert_png = pytest.importorskip("test_plotting").assert_png
    path = tmp_path / "sweep.png"
    assert cli.main(["lr-sweep", "--optimizer", "ADAMW", "--count", "4", "--min-lr", "1e-3", "--max-lr", "10",
                     "--steps", "30", "--hidden", "32", "--threads", "1", "-o", str(path)]) == 0
    assert_png(path)
    out = capsys.readouterr().out
    assert "4 rates from 0.001 to 10, 30 steps each" in out and "diverged at step" in out
    assert "best lr: " in out and "lr-find suggested: " in out and f"wrote {path}" in out


@pytest.mark.parametrize("argv, message", [
    (["--count", "0"], "argument --count: must be >= 1, got 0"),
    (["--steps", "-3"], "argument --steps: must be >= 1"),
    (["--min-lr", "0"], "argument --min-lr: must be a finite number > 0"),
    (["--optimizer", "nope"], "unknown optimizer 'nope'"),
])
def test_command_mistakes_exit_with_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["lr-sweep", *argv, "-o", str(tmp_path / "x.png")])
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_command_refuses_a_reversed_range(tmp_path, capsys):
    assert cli.main(["lr-sweep", "--min-lr", "1", "--max-lr", "0.1", "-o", str(tmp_path / "x.png")]) == 2
    assert "--max-lr (0.1) must be at least --min-lr (1)" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
