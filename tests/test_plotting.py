"""PNG pictures: schedules, range tests and benchmark rows, drawn without pyplot."""
import numpy as np
import pytest

import fastopt as fo

matplotlib_image = pytest.importorskip("matplotlib.image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    """``path`` is a PNG with something drawn in it (more than one colour)."""
    with open(path, "rb") as file:
        assert file.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    image = matplotlib_image.imread(path)
    colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
    assert len(colours) > 10, f"{path} looks blank ({len(colours)} colours)"


def test_one_schedule(tmp_path):
    path = tmp_path / "onecycle.png"
    assert fo.schedules.plot(fo.schedules.onecycle(max_lr=0.01, total_steps=100), 100, path) == str(path)
    assert_png(path)


def test_several_schedules_with_labels_and_explicit_steps(tmp_path):
    path = tmp_path / "several.png"
    schedules = [fo.schedules.cosine(0.1, t_max=50), fo.schedules.warmup(fo.schedules.constant(0.1), 10),
                 fo.schedules.multistep(0.1, milestones=[20, 40])]
    fo.schedules.plot(schedules, np.arange(0, 60, 3), path, labels=["cosine", "warmup", "multistep"])
    assert_png(path)
    with pytest.raises(ValueError, match="labels"):
        fo.schedules.plot(schedules, 10, path, labels=["one"])
    with pytest.raises(TypeError, match="Schedule"):
        fo.schedules.plot([0.1], 10, path)


def test_schedule_labels_show_what_differs_from_the_defaults():
    from fastopt.plotting import schedule_label

    assert schedule_label(fo.schedules.onecycle(max_lr=0.01, total_steps=1000)) == \
        "OneCycle(max_lr=0.01, total_steps=1000)"
    assert schedule_label(fo.schedules.warmup(fo.schedules.cosine(0.1, t_max=100), warmup_steps=10)) == \
        "Warmup(schedule=Cosine(lr=0.1, t_max=100), warmup_steps=10)"


def test_lr_find_plot(tmp_path):
    params = [np.ones(4)]
    result = fo.lr_find(fo.SGD(params), lambda: (float(np.sum(params[0] ** 2)) + 0.1, [2 * params[0]]),
                        start_lr=1e-4, end_lr=10.0, num_steps=60)
    assert result.suggestion is not None
    path = tmp_path / "lr.png"
    result.plot(path)
    assert_png(path)


def test_bench_plot(tmp_path):
    rows = [dict(optimizer=name, size="4M", backend=backend, gb_per_s=gbps, fraction_of_ceiling=gbps / ceiling)
            for name, ceiling in (("Adam", 40.0), ("SGD", 30.0))
            for backend, gbps in (("ceiling", ceiling), ("fastopt", ceiling * 0.95), ("torch", ceiling * 0.2))]
    path = tmp_path / "bench.png"
    from fastopt.plotting import plot_bench

    plot_bench(rows, path)
    assert_png(path)
