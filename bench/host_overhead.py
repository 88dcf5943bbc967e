"""The host's work per step: what fastopt spends in Python around its kernel, per tensor.

GPT-2 small's 148 tensors shrunk to 8 elements each, so that the kernel costs almost nothing and the time of a step
is the per-tensor host work (checks, tables, addresses). Optionally beside an earlier tree of fastopt (a commit
extracted with ``git archive``), timed interleaved in one run: each tree runs in a worker process of its own, and
every round asks each worker for one timing, in alternating order, so both see the same machine.

    python bench/host_overhead.py                                   # this tree
    mkdir -p /tmp/base && git archive 4038fc6 | tar -x -C /tmp/base
    ln -s ../kernels /tmp/base/fastopt/kernels     # where an install would put them: that tree's, not this one's
    python bench/host_overhead.py --baseline /tmp/base              # this tree beside that one

Rows: ``plain`` (Adam, no grad control), ``clipped`` (``max_grad_norm``: one more pass over the grads) and
``torch`` (``fastopt.torch.Adam`` over CPU tensors, the adapter's work included). Reports the median over rounds of
the microseconds per tensor per step, and each row's ratio to the baseline's.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import numpy as np
import fastopt as fo
from fastopt.benchmark import gpt2_small_shapes

shapes = gpt2_small_shapes()
rng = np.random.default_rng(0)
params = [rng.standard_normal(8).astype(np.float32) for _ in shapes]
grads = [rng.standard_normal(8).astype(np.float32) for _ in shapes]

def torch_step():
    import torch, fastopt.torch as fot
    torch.set_num_threads(2)
    weights = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    for weight, grad in zip(weights, grads):
        weight.grad = torch.from_numpy(grad.copy())
    return fot.Adam(weights, lr=1e-3).step

steps = {"plain": fo.Adam([p.copy() for p in params], lr=1e-3),
         "clipped": fo.Adam([p.copy() for p in params], lr=1e-3, max_grad_norm=1.0)}
calls = {name: (lambda optimizer=optimizer: optimizer.step(grads)) for name, optimizer in steps.items()}
calls["torch"] = torch_step()
for call in calls.values():
    for _ in range(200):
        call()
print("ready", flush=True)
for line in sys.stdin:
    name, repeats = line.split()
    call = calls[name]
    start = time.perf_counter()
    for _ in range(int(repeats)):
        call()
    print(json.dumps((time.perf_counter() - start) / int(repeats) / len(shapes) * 1e6), flush=True)
"""
ROWS = ("plain", "clipped", "torch")


class Worker:
    """A process that steps the rows' optimizers of one fastopt tree on request."""

    def __init__(self, tree):
        environment = dict(os.environ, NUMBA_NUM_THREADS="2")
        if tree is not None:
            environment["PYTHONPATH"] = os.path.abspath(tree)
        self.process = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=environment, cwd=tree or None)
        assert self.process.stdout.readline().strip() == "ready"

    def time(self, row, repeats):
        self.process.stdin.write(f"{row} {repeats}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="an earlier fastopt tree to time beside this one")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=300, help="steps per timing")
    parser.add_argument("--json", help="write the results here")
    arguments = parser.parse_args()
    trees = {"this tree": None} | ({"baseline": arguments.baseline} if arguments.baseline else {})
    workers = {name: Worker(tree) for name, tree in trees.items()}
    timings = {(name, row): [] for name in workers for row in ROWS}
    for round_number in range(arguments.rounds):
        order = list(workers) if round_number % 2 == 0 else list(reversed(workers))
        for row in ROWS:
            for name in order:
                timings[name, row].append(workers[name].time(row, arguments.repeats))
    for worker in workers.values():
        worker.close()
    medians = {f"{name}/{row}": statistics.median(values) for (name, row), values in timings.items()}
    print(f"microseconds per tensor per step (148 tensors of 8 elements, median of {arguments.rounds} rounds)")
    for row in ROWS:
        line = f"  {row:8s} this tree {medians[f'this tree/{row}']:6.2f}"
        if arguments.baseline:
            baseline = medians[f"baseline/{row}"]
            line += f"   baseline {baseline:6.2f}   ratio {medians[f'this tree/{row}'] / baseline:5.3f}"
        print(line)
    if arguments.json:
        with open(arguments.json, "w") as file:
            json.dump({"medians_us_per_tensor": medians, "rounds": arguments.rounds,
                       "repeats": arguments.repeats, "baseline": arguments.baseline}, file, indent=1)


if __name__ == "__main__":
    main()
