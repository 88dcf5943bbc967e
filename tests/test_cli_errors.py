"""A mistake on the ``fastopt`` command line exits with status 2 and a one-line message that names the option and
what was typed, before any work starts; never a traceback. Names are read in any case."""
import subprocess
import sys

import numpy as np
import pytest

import fastopt as fo
from fastopt import cli

# (argv, what the error line must contain). {missing} is a folder that does not exist, {folder} one that does.
MISTAKES = [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["demo", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    # bench
    (["bench", "--optimizers", "Yogi"], "--optimizers: unknown optimizer 'Yogi'; choose from SGD, SGD_momentum"),
    (["bench", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["bench", "--repeats", "-3"], "argument --repeats: must be >= 1, got -3"),
    (["bench", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["bench", "--threads", "100000"], "argument --threads: must be at most"),
    (["bench", "--threads", "two"], "argument --threads: expected an integer, got 'two'"),
    (["bench", "--sizes", "0"], "argument --sizes: size must be at least 1 param, got '0'"),
    (["bench", "--sizes", "lots"], "argument --sizes: cannot read the size 'LOTS'"),
    (["bench", "--json", "{missing}/bench.json"], "argument --json: cannot write '{missing}/bench.json'"),
    (["bench", "--plot", "{missing}/bench.png"], "argument --plot: cannot write '{missing}/bench.png'"),
    (["bench", "--json", "{folder}"], "argument --json: expected a file name, got the folder '{folder}'"),
    # demo
    (["demo", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["demo", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["demo", "--epochs", "2.5"], "argument --epochs: expected an integer, got '2.5'"),
    (["demo", "--lr", "-1"], "argument --lr: must be a finite number > 0, got '-1'"),
    (["demo", "--lr", "0"], "argument --lr: must be a finite number > 0, got '0'"),
    (["demo", "--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    (["demo", "--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["demo", "--hidden", "0"], "argument --hidden: must be >= 1, got 0"),
    (["demo", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["demo", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["demo", "--optimizer", "yogi"], "argument --optimizer: unknown optimizer 'yogi'; choose from SGD, RMSprop"),
    (["demo", "--schedule", "linear"], "argument --schedule: unknown schedule 'linear'; choose from onecycle"),
    # lr-find
    (["lr-find", "--num-steps", "1"], "argument --num-steps: must be >= 2, got 1"),
    (["lr-find", "--start-lr", "0"], "argument --start-lr: must be a finite number > 0, got '0'"),
    (["lr-find", "--end-lr", "-1"], "argument --end-lr: must be a finite number > 0, got '-1'"),
    (["lr-find", "--start-lr", "1", "--end-lr", "0.1"], "--end-lr (0.1) must be greater than --start-lr (1)"),
    (["lr-find", "--mode", "log"], "argument --mode: unknown mode 'log'; choose from exp, linear"),
    (["lr-find", "--optimizer", "yogi"], "argument --optimizer: unknown optimizer 'yogi'"),
    (["lr-find", "--batch-size", "-64"], "argument --batch-size: must be >= 1, got -64"),
    (["lr-find", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["lr-find", "-o", "{missing}/lr.png"], "argument -o/--output: cannot write '{missing}/lr.png'"),
    # schedule
    (["schedule", "nope"], "unknown schedule 'nope'"),
    (["schedule", "warmup"], "use the Python API"),
    (["schedule", "cosine"], "cosine needs lr, t_max"),
    (["schedule", "cosine", "--args", "lr"], "keys from lr, t_max, eta_min; got 'lr'"),
    (["schedule", "cosine", "--args", "lr=0.1", "t_max=10", "bogus=1"], "got 'bogus=1'"),
    (["schedule", "onecycle", "--args", "max_lr=-1", "total_steps=10"], "max_lr"),
    (["schedule", "cosine", "--args", "lr=0.1", "t_max=10", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["schedule", "cosine", "--args", "lr=0.1", "t_max=10", "-o", "{missing}/c.png"],
     "argument -o/--output: cannot write '{missing}/c.png'"),
]


def exit_status(argv, capsys):
    """``main``'s exit status and its (stdout, stderr). What argparse and the argument types catch raises
    SystemExit(2), as argparse does; what a command finds itself (an unknown bench optimizer, a schedule's --args,
    --end-lr below --start-lr) comes back as main's return value, as before."""
    try:
        status = cli.main(argv)
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("argv, message", MISTAKES, ids=[" ".join(argv) for argv, _ in MISTAKES])
def test_a_mistake_exits_2_with_one_line_naming_it(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output path would land here
    places = dict(missing=str(tmp_path / "missing"), folder=str(tmp_path))
    status, out, err = exit_status([word.format(**places) for word in argv], capsys)
    assert status == 2
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message.format(**places) in errors[0], err
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_bare_fastopt_prints_the_help():
    result = subprocess.run([sys.executable, "-m", "fastopt"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: fastopt" in result.stderr and "lr-find" in result.stderr and "required" not in result.stderr


@pytest.mark.parametrize("typed, spelled", [("adamw", "AdamW"), ("ADAM", "Adam"), ("sgd", "SGD"),
                                            ("RmsProp", "RMSprop")])
def test_demo_and_lr_find_read_optimizer_names_in_any_case(typed, spelled):
    for command in ("demo", "lr-find"):
        assert cli.parser().parse_args([command, "--optimizer", typed]).optimizer == spelled


def test_schedule_names_in_any_case():
    assert cli.parser().parse_args(["demo", "--schedule", "Warmup-Cosine"]).schedule == "warmup_cosine"
    assert cli.parser().parse_args(["lr-find", "--mode", "LINEAR"]).mode == "linear"
    assert cli.build_schedule("OneCycle", ["max_lr=0.1", "total_steps=10"]) == fo.schedules.onecycle(0.1, 10)


def test_commands_pass_the_names_the_library_spells(monkeypatch, capsys):
    from fastopt import benchmark, demo

    seen = {}

    def refuse(what):
        def record(*args, **kwargs):
            seen[what] = (args, kwargs)
            raise ValueError("stopped by the test")
        return record

    monkeypatch.setattr(benchmark, "run", refuse("bench"))
    monkeypatch.setattr(demo, "train", refuse("demo"))
    monkeypatch.setattr(demo, "range_test", refuse("lr-find"))
    assert cli.main(["bench", "--optimizers", "adam", "sgd-MOMENTUM", "--no-progress"]) == 2
    assert seen["bench"][1]["optimizer_names"] == ["Adam", "SGD_momentum"]
    assert cli.main(["demo", "--optimizer", "AdamW"]) == 2
    assert seen["demo"][0][0] == "adamw"  # the demo module's keys are lowercase
    assert cli.main(["lr-find", "--optimizer", "RMSPROP"]) == 2
    assert seen["lr-find"][0][0] == "rmsprop"
    assert capsys.readouterr().err.count("stopped by the test") == 3


def test_bench_names_match_the_benchmark():
    from fastopt import benchmark

    assert cli.BENCH_OPTIMIZERS == tuple(benchmark.CASES)


def test_every_option_says_its_default():
    top = cli.parser()
    commands = next(action for action in top._actions if action.dest == "command").choices
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.nargs != 0:  # not the schedule's name, nor an on/off flag
                assert "default" in (action.help or ""), f"fastopt {name} {action.option_strings}"


# The library's first-contact messages, beside the command's.
def test_torch_tensors_point_to_fastopt_torch():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"torch.nn.parameter.Parameter.*fastopt.torch.Adam"):
        fo.Adam(torch.nn.Linear(2, 3).parameters())


def test_a_float16_grad_says_how_to_convert_it():
    optimizer = fo.Adam([np.zeros(3, np.float32)])
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype float16; .* convert it with grad.astype\(np.float32\)"):
        optimizer.step([np.zeros(3, np.float16)])
