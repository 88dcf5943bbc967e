"""``fastopt.save`` / ``fastopt.load`` as files: the path rule, the atomic write, and a save killed half-way."""
import contextlib
import errno
import io
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fastopt as fo

SIZES = (0, 1, 13, 4099)


def stepped_adam(steps, seed=5):
    """An Adam over float32 params of every size in SIZES after ``steps`` steps, and the grads for 3 more."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(size).astype(np.float32) for size in SIZES]
    optimizer = fo.Adam(params, lr=0.01, weight_decay=0.1)
    for _ in range(steps):
        optimizer.step([rng.standard_normal(size).astype(np.float32) for size in SIZES])
    later_grads = [[rng.standard_normal(size).astype(np.float32) for size in SIZES] for _ in range(3)]
    return optimizer, params, later_grads


def assert_same_state(actual, expected):
    actual, expected = actual.state_dict(), expected.state_dict()
    assert actual["step_count"] == expected["step_count"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, buffers in expected["state"].items():
        assert actual["state"][index].keys() == buffers.keys()
        for name, value in buffers.items():
            np.testing.assert_array_equal(actual["state"][index][name], value, err_msg=f"state[{index}][{name}]")


@pytest.mark.parametrize("save_as,load_as", [
    ("dir/ckpt", "dir/ckpt"),
    ("dir/ckpt", "dir/ckpt.npz"),
    ("dir/ckpt.npz", "dir/ckpt"),
    pytest.param(pathlib.Path("dir/ckpt"), pathlib.Path("dir/ckpt"), id="pathlib"),
])
def test_save_and_load_agree_on_the_path_and_resume_exactly(save_as, load_as, tmp_path):
    """``ckpt`` and ``ckpt.npz`` name the same file on both sides; 4 steps + save + load + 3 steps equal 7 steps of
    the optimizer that was saved, bit for bit, in params and every state buffer."""
    (tmp_path / "dir").mkdir()
    original, params, later_grads = stepped_adam(4)
    written = fo.save(tmp_path / save_as, original)
    assert written == str(tmp_path / "dir" / "ckpt.npz")
    assert sorted(os.listdir(tmp_path / "dir")) == ["ckpt.npz"]

    resumed_params = [param.copy() for param in params]
    resumed = fo.Adam(resumed_params, lr=0.5)  # the file's lr must replace 0.5
    fo.load(tmp_path / load_as, resumed)
    for grads in later_grads:
        original.step(grads)
        resumed.step(grads)
    for ours, theirs in zip(resumed_params, params):
        np.testing.assert_array_equal(ours, theirs)
    assert_same_state(resumed, original)


def test_load_of_a_missing_file_names_the_path_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        fo.load(tmp_path / "absent", fo.Adam([np.ones(3, np.float32)]))
    assert raised.value.filename == str(tmp_path / "absent.npz")


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A write error (here a full disk after half the archive) propagates; the previous file keeps every byte and
    no temporary file is left behind."""
    optimizer, _, later_grads = stepped_adam(2)
    path = fo.save(tmp_path / "ckpt", optimizer)
    previous = pathlib.Path(path).read_bytes()
    optimizer.step(later_grads[0])
    real_savez = np.savez

    def savez_that_stops_half_way(file, *args, **kwargs):
        archive = io.BytesIO()
        real_savez(archive, *args, **kwargs)
        file.write(archive.getvalue()[:archive.tell() // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_that_stops_half_way)
    with pytest.raises(OSError, match="No space left"):
        fo.save(tmp_path / "ckpt", optimizer)
    assert pathlib.Path(path).read_bytes() == previous
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_save_through_a_symlink_replaces_the_file_it_points_to(tmp_path):
    """As when np.savez opened the target: ``latest.npz -> runs/step-2.npz`` stays a link, to the new state."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "latest.npz").symlink_to(pathlib.Path("runs") / "step-2.npz")
    optimizer, _, _ = stepped_adam(2)
    fo.save(tmp_path / "latest", optimizer)
    assert (tmp_path / "latest.npz").is_symlink()
    assert os.listdir(tmp_path / "runs") == ["step-2.npz"]
    loaded = fo.Adam([np.zeros(size, np.float32) for size in SIZES])
    fo.load(tmp_path / "runs" / "step-2.npz", loaded)
    assert_same_state(loaded, optimizer)


# Saves Adam's state for one 16M-element param (2 x 64 MB) after each step, forever. Before the save of step k it
# writes expected-<k>.npy, that save's exp_avg[:1000].
SAVE_FOREVER = textwrap.dedent("""
    import sys
    import numpy as np
    import fastopt as fo

    directory = sys.argv[1]
    param = np.zeros(16 * 2**20, np.float32)
    optimizer = fo.Adam([param], lr=1e-3)
    grad = np.linspace(-1, 1, param.size, dtype=np.float32)
    while True:
        optimizer.step([grad])
        np.save(f"{directory}/expected-{optimizer.step_count}.npy", optimizer.state[0]["exp_avg"][:1000])
        fo.save(f"{directory}/ckpt", optimizer)
""")


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL a process while it writes a 128 MB checkpoint over its previous one: the file at the path still
    loads, and holds the previous checkpoint's state."""
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        child = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(tmp_path)], stdout=subprocess.DEVNULL,
                                 stderr=stderr)

    def wait_for(condition, seconds, what):
        """Poll ``condition()`` until it returns something true, and return that."""
        deadline = time.monotonic() + seconds
        while not (found := condition()):
            assert child.poll() is None, f"the saving process died waiting for {what}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no {what} after {seconds} s:\n{log.read_text()}"
            time.sleep(0.002)
        return found

    def half_written_temporary():
        for temporary in tmp_path.glob(".ckpt.npz.tmp-*"):
            with contextlib.suppress(FileNotFoundError):  # renamed since the glob
                if temporary.stat().st_size >= 2**20:  # inside the archive, far from its end
                    return temporary
        return None

    try:
        # expected-2 is written after the first save is complete, so a temporary file seen from then on belongs to
        # a later save.
        wait_for((tmp_path / "expected-2.npy").exists, 60, "first complete save")
        half_written = wait_for(half_written_temporary, 10, "temporary file of 1 MB after the first save")
    finally:
        child.kill()  # SIGKILL
        child.wait()
    assert half_written.exists(), "the kill came after the save being watched had finished"

    # The save that was killed is the last one begun (normally step 2's), so the file must hold the one before.
    in_progress = max(int(path.stem.removeprefix("expected-")) for path in tmp_path.glob("expected-*.npy"))
    loaded = fo.Adam([np.zeros(16 * 2**20, np.float32)], lr=1e-3)
    fo.load(tmp_path / "ckpt", loaded)
    assert loaded.step_count == in_progress - 1 >= 1
    np.testing.assert_array_equal(loaded.state[0]["exp_avg"][:1000],
                                  np.load(tmp_path / f"expected-{in_progress - 1}.npy"))
    assert loaded.state[0]["exp_avg_sq"].shape == (16 * 2**20,)
