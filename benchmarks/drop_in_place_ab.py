"""One case of the drop-path A/B of benchmarks/NOTES.md: ``python benchmarks/drop_in_place_ab.py CASE clean|nan``.

Times one call (median of 5 after a warm-up) on a resnet18-size G of 20 clients, with or without a
NaN in row 3, and reports the process's peak RSS. Run it once per build, each in a fresh process
(PYTHONPATH picks the build), alternating the builds.
"""
import json
import resource
import sys
import time

import torch

import robustagg
from robustagg import aggregators as A, ops

case, nan = sys.argv[1], sys.argv[2] == "nan"
torch.set_num_threads(2)
n, d = 20, 11_173_962
G = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
if nan:
    G[3, 5] = float("nan")
calls = {
    "median": lambda: ops.median(G, nonfinite="drop"),
    "trimmed_mean": lambda: ops.trimmed_mean(G, 5, nonfinite="drop"),
    "sign_sum": lambda: ops.sign_sum(G, nonfinite="drop"),
    "rlr": lambda: ops.rlr(G, 4, nonfinite="drop"),
    "closest": lambda: ops.closest_to_median_mean(G, 10, nonfinite="drop"),
    "FedAvg": lambda: A.FedAvg()(G),
    "TrimmedMean": lambda: A.TrimmedMean(trim=4)(G),
    "Bulyan": lambda: A.Bulyan(f=3)(G),
}
fn = calls[case]
fn()
times = []
for _ in range(5):
    t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"case": case, "nan": nan, "ms": 1e3 * times[2], "min_ms": 1e3 * times[0],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "robustagg": robustagg.__file__}))
