"""Packaging promises: what `import fastopt` pulls in, and that a second process loads kernels from the cache."""
import json
import subprocess
import sys

PROBE = """
import json, sys
import numpy as np
import fastopt as fo
heavy = sorted(name for name in ("torch", "matplotlib", "cupy", "sklearn") if name in sys.modules)
from fastopt.kernels.cpu import fused, layout as tables
for size in (100, tables.SERIAL_BELOW):  # the single-threaded twin, then the parallel kernel
    fo.Adam([np.ones(size, np.float32)]).step([np.ones(size, np.float32)])
kernels = fused.step_kernels("adam", 0b011, 0b100)[::-1]  # Adam's state slots: always two, and AMSGrad's
print(json.dumps({"heavy": heavy, "hits": [sum(k.stats.cache_hits.values()) for k in kernels],
                  "misses": [sum(k.stats.cache_misses.values()) for k in kernels]}))
"""


def run_probe():
    output = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def test_import_is_light_and_second_process_uses_the_kernel_cache():
    run_probe()  # compiles (or loads) and fills the cache
    result = run_probe()
    assert result["heavy"] == [], f"import fastopt pulled in {result['heavy']}"
    assert result["hits"] == [1, 1] and result["misses"] == [0, 0], result
