"""Launch-shape sweep of the CUDA kernels on one GPU, float32 AdamW and RMSprop, every figure beside the
device-to-device copy ceiling measured in the same run. Not a test suite: a script for a device-machine session.

    python bench/tune_gpu.py [--out tune.json]

For each launch shape (threads per block, elements per thread in flight, blocks per multiprocessor) the kernels
are recompiled (the shape is a compile-time constant) and each (optimizer, size) is timed as CUDA-graph replays,
interleaved round by round with the copy ceiling, rotating through enough buffer sets that no replay reads what
an earlier one left in L2. Also measured: the replay time of a captured step of one tiny tensor and of the 148
GPT-2 tensors at 1 element each (the per-step overhead that bandwidth cannot explain).
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import cupy
import numpy as np

import fastopt as fo
from fastopt.backends import cuda

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import GPT2_SHAPES  # noqa: E402

SHAPES = [(256, 4, 8), (256, 8, 8), (512, 4, 4), (128, 4, 16), (256, 4, 16), (256, 2, 8)]  # block, ILP, blocks/SM
SIZES = {"16M": [(1 << 24,)], "256M": [(1 << 28,)], "GPT2": GPT2_SHAPES}
OPTIMIZERS = {"AdamW": (fo.AdamW, 2), "RMSprop": (fo.RMSprop, 1)}
ROUNDS = 9


def set_shape(block, ilp, blocks_per_multiprocessor):
    cuda.BLOCK, cuda.ILP, cuda.BLOCKS_PER_MULTIPROCESSOR = block, ilp, blocks_per_multiprocessor
    cuda._FUNCTIONS.clear()
    cuda._MODULES.clear()


def events_ms(launch, repeats, stream):
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    for index in range(repeats):
        launch(index)
    end.record(stream)
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / repeats


def sets_needed(distinct_bytes):
    l2 = cupy.cuda.Device().attributes["L2CacheSize"]
    return 1 if distinct_bytes >= 3 * l2 else 1 + math.ceil(3 * l2 / distinct_bytes)


def optimizer_replay(cls, shapes, stream, copies):
    graphs, keep = [], []
    rng = cupy.random.default_rng(0)
    with stream:
        for _ in range(copies):
            params = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
            grads = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
            optimizer = cls(params, lr=1e-3)
            optimizer.step(grads)
            stream.begin_capture()
            optimizer.step(grads)
            graphs.append(stream.end_capture())
            keep.append((params, grads, optimizer))
    stream.synchronize()
    return (lambda index: graphs[index % copies].launch(stream)), keep


def copy_launch(nbytes, stream, copies):
    sources = [cupy.ones(nbytes, dtype=np.uint8) for _ in range(copies)]
    targets = [cupy.zeros(nbytes, dtype=np.uint8) for _ in range(copies)]
    return (lambda index: targets[index % copies].data.copy_from_device_async(sources[index % copies].data, nbytes,
                                                                               stream)), (sources, targets)


def measure(cls, states, shapes, stream):
    params = sum(int(np.prod(shape)) for shape in shapes)
    moved = params * 4 * (3 + 2 * states)
    copies = sets_needed(params * 4 * (2 + states))
    step, keep = optimizer_replay(cls, shapes, stream, copies)
    ceiling, keep_copy = copy_launch(moved // 2, stream, sets_needed(moved))
    repeats = max(copies, min(200, math.ceil(20e9 / moved)))
    times = {"fastopt_graph": [], "ceiling": []}
    for _ in range(ROUNDS):
        times["fastopt_graph"].append(events_ms(step, repeats, stream))
        times["ceiling"].append(events_ms(ceiling, repeats, stream))
    del keep, keep_copy
    cupy.get_default_memory_pool().free_all_blocks()
    medians = {name: statistics.median(values) for name, values in times.items()}
    return dict(params=params, bytes=moved, ms=medians["fastopt_graph"], ceiling_ms=medians["ceiling"],
                fraction=medians["ceiling"] / medians["fastopt_graph"])


def overhead(stream):
    """Replay time of a captured step over tiny tensors: launch and the kernel's fixed cost."""
    results = {}
    for name, shapes in {"1 tensor of 1024": [(1024,)], "148 tensors of 1": [(1,)] * 148}.items():
        step, keep = optimizer_replay(fo.AdamW, shapes, stream, 1)
        results[name] = statistics.median(events_ms(step, 1000, stream) for _ in range(5)) * 1e3  # microseconds
        del keep
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tune.json")
    parser.add_argument("--sizes", default=",".join(SIZES))
    args = parser.parse_args()
    stream = cupy.cuda.Stream(non_blocking=True)
    report = {"gpu": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "rows": []}
    default = (cuda.BLOCK, cuda.ILP, cuda.BLOCKS_PER_MULTIPROCESSOR)
    for shape in [default] + [s for s in SHAPES if s != default]:
        set_shape(*shape)
        for size in args.sizes.split(","):
            for name, (cls, states) in OPTIMIZERS.items():
                row = dict(block=shape[0], ilp=shape[1], blocks_per_sm=shape[2], size=size, optimizer=name,
                           **measure(cls, states, SIZES[size], stream))
                report["rows"].append(row)
                print(f"block {shape[0]:4d} ilp {shape[1]} bpsm {shape[2]:2d} {name:8s} {size:5s} "
                      f"{row['ms']:.4f} ms  ceiling {row['ceiling_ms']:.4f} ms  fraction {row['fraction']:.3f}",
                      flush=True)
    set_shape(*default)
    report["overhead_us"] = overhead(stream)
    print("graph replay of tiny steps (us):", report["overhead_us"])
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
