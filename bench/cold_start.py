"""Start-up cost in fresh processes: ``import fastopt`` and the first ``opt.step`` (Adam, float32, 1M params).

One untimed process first fills Numba's on-disk cache; then each of ``--processes`` fresh interpreters times
its import, the optimizer's construction (which loads the CPU backend) and its first step. Prints the medians.
Targets: import <= 0.5 s, first step <= 0.5 s.

    python bench/cold_start.py [--processes 5]
"""
import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import json, time
start = time.perf_counter()
import fastopt
imported = time.perf_counter()
import numpy as np
params, grads = [np.ones(1 << 20, np.float32)], [np.full(1 << 20, 0.5, np.float32)]
built = time.perf_counter()
optimizer = fastopt.Adam(params)
constructed = time.perf_counter()
optimizer.step(grads)
stepped = time.perf_counter()
print(json.dumps({"import fastopt": imported - start, "construct Adam": constructed - built,
                  "first step": stepped - constructed, "construct + first step": stepped - built}))
"""


def probe():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=5)
    arguments = parser.parse_args()
    probe()  # warms the Numba cache
    samples = [probe() for _ in range(arguments.processes)]
    print(f"median of {arguments.processes} fresh processes, warm Numba cache (targets: import and first step "
          "<= 0.5 s each)")
    for name in samples[0]:
        values = [sample[name] for sample in samples]
        print(f"  {name:24s} {statistics.median(values):6.3f} s   (min {min(values):.3f}, max {max(values):.3f})")


if __name__ == "__main__":
    main()
