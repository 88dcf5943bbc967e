"""The ``fastopt`` command: every subcommand in-process with tiny settings, plus the installed entry points."""
import json
import shutil
import subprocess
import sys

import pytest

from fastopt import cli

assert_png = pytest.importorskip("test_plotting").assert_png


def test_schedule_writes_a_plot(tmp_path, capsys):
    path = tmp_path / "onecycle.png"
    assert cli.main(["schedule", "onecycle", "--args", "max_lr=0.01", "total_steps=1000", "--steps", "1000",
                     "-o", str(path)]) == 0
    assert_png(path)
    out = capsys.readouterr().out
    assert "max 0.01 at step 299" in out and f"wrote {path}" in out


def test_schedule_arguments(tmp_path):
    built = cli.build_schedule("multistep", ["lr=0.1", "milestones=30,60", "gamma=0.5"])
    assert built == __import__("fastopt").schedules.multistep(0.1, milestones=(30, 60), gamma=0.5)
    assert cli.build_schedule("multistep", ["lr=1", "milestones=30"]).milestones == (30,)
    assert cli.build_schedule("cyclic", ["base_lr=1e-3", "max_lr=1e-2", "mode=exp_range", "gamma=0.99",
                                         "step_size_down=none"]).step_size_down == 2000
    assert cli.build_schedule("step-decay", ["lr=0.1", "step_size=10"]).step_size == 10
    assert cli.parse_value("true") is True and cli.parse_value("3") == 3 and cli.parse_value("1e-3") == 1e-3


@pytest.mark.parametrize("argv, message", [
    (["schedule", "warmup"], "use the Python API"),
    (["schedule", "sequential"], "use the Python API"),
    (["schedule", "nope"], "unknown schedule"),
    (["schedule", "cosine", "--args", "lr=0.1"], "needs lr, t_max"),
    (["schedule", "cosine", "--args", "lr=0.1", "t_max=10", "bogus=1"], "keys from lr, t_max, eta_min"),
    (["schedule", "onecycle", "--args", "max_lr=0.1", "total_steps=10", "pct_start=2"], "pct_start"),
])
def test_schedule_errors(argv, message, capsys, tmp_path):
    assert cli.main(argv + ["-o", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_bench_tiny(tmp_path, capsys):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(["bench", "--quick", "--optimizers", "Adam", "SGD_momentum", "--sizes", "64K", "--repeats", "2",
                     "--threads", "1", "--json", str(json_path), "--plot", str(png_path)]) == 0
    captured = capsys.readouterr()
    assert "fastopt speed-up" in captured.out and "ceiling" in captured.out
    assert "2/" in captured.err  # the progress bar
    result = json.loads(json_path.read_text())
    assert result["settings"]["threads"] == 1 and result["settings"]["repeats"] == 2
    rows = result["rows"]
    backends = {(row["optimizer"], row["backend"]) for row in rows}
    assert {("Adam", "ceiling"), ("Adam", "fastopt"), ("SGD_momentum", "fastopt")} <= backends
    for row in rows:
        assert row["params"] == 65536 and len(row["samples_ms"]) == 2 and row["ms_per_step"] > 0
        assert row["bytes_per_step"] == 65536 * (28 if row["optimizer"] == "Adam" else 20)
        assert row["gb_per_s"] == pytest.approx(row["bytes_per_step"] / row["ms_per_step"] / 1e6)
        assert (row["fastopt_speedup"] is not None) == row["backend"].startswith("torch")
    assert_png(png_path)


def test_bench_rejects_unknown_names(capsys, tmp_path):
    assert cli.main(["bench", "--optimizers", "Yogi", "--json", str(tmp_path / "b.json")]) == 2
    assert "unknown optimizer" in capsys.readouterr().err


def test_demo_trains_to_a_good_accuracy(capsys):
    pytest.importorskip("sklearn")
    assert cli.main(["demo", "--optimizer", "adamw", "--schedule", "onecycle"]) == 0
    out = capsys.readouterr().out
    assert out.count("epoch") >= 20 and "optimizer.step" in out
    accuracy = float(out.split("test accuracy ")[-1].split()[0])
    assert accuracy > 0.9, out


@pytest.mark.parametrize("optimizer, schedule", [("sgd", "cosine"), ("rmsprop", "warmup_cosine"), ("adam", "step"),
                                                ("lamb", "onecycle"), ("adamwschedulefree", None),
                                                ("sgdschedulefree", None)])
def test_demo_other_optimizers(optimizer, schedule, capsys):
    pytest.importorskip("sklearn")
    schedule_options = [] if schedule is None else ["--schedule", schedule]
    assert cli.main(["demo", "--optimizer", optimizer, *schedule_options, "--epochs", "10", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("test accuracy ")[-1].split()[0])
    assert accuracy > 0.9
    if schedule is None:  # schedule-free: a constant rate after the warmup, evaluated at the average (eval())
        assert "with a constant schedule" in out


def test_demo_refuses_a_decay_schedule_for_schedule_free(capsys):
    assert cli.main(["demo", "--optimizer", "AdamWScheduleFree", "--schedule", "cosine", "--epochs", "1"]) == 2
    assert "takes no lr schedule" in capsys.readouterr().err


def test_lr_find_command(tmp_path, capsys):
    pytest.importorskip("sklearn")
    path = tmp_path / "lr.png"
    assert cli.main(["lr-find", "--num-steps", "60", "--threads", "1", "-o", str(path)]) == 0
    out = capsys.readouterr().out
    suggestion = float(out.split("steepest descent): ")[1].split()[0])
    assert 1e-4 < suggestion < 1.0  # Adam on a small MLP
    assert_png(path)


def test_python_dash_m_and_the_installed_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastopt", "--help"], capture_output=True, text=True, check=True)
    for command in ("bench", "demo", "lr-find", "schedule"):
        assert command in result.stdout
    executable = shutil.which("fastopt")
    if executable is None:
        pytest.skip("the fastopt console script is not installed (pip install -e .)")
    path = tmp_path / "cosine.png"
    subprocess.run([executable, "schedule", "cosine", "--args", "lr=0.1", "t_max=100", "--steps", "200", "-o",
                    str(path)], capture_output=True, text=True, check=True)
    assert_png(path)
    failed = subprocess.run([executable, "schedule", "warmup"], capture_output=True, text=True)
    assert failed.returncode == 2 and "Python API" in failed.stderr
