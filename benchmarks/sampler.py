"""Planning one epoch of the distributed weighted sampler at 10M samples: time and peak memory per rank.

    .venv/bin/python benchmarks/sampler.py [--n 10000000] [--ranks 8 64] [--threads 1]

Each (method, ranks) runs in its own subprocess (cold start, its own peak RSS) as rank 0 of R (every
rank does the same work). The weights are MELD-like imbalanced labels (7 classes, 47% neutral)
with inverse-frequency class weights, built before the clock starts. "Plan" = constructing the
sampler and getting the first index of the epoch (every method materialises its epoch there);
`replan_min_s` is the fastest of re-planning epochs 1-3 in the same process (the machine is shared:
the minimum is the least disturbed figure; `loadavg` is recorded). Peak RSS is the kernel's high-water mark
(VmHWM) reset just before planning (/proc/self/clear_refs), so `plan_extra_mb` = peak minus the RSS
the process already had (interpreter, torch, the 80 MB weight array), and `peak_rss_mb` is absolute
(`rss_after_import_mb`: what `import torch` + mmer_dist alone cost, before any data).

Methods:
  dws_with        DistributedWeightedSampler(replacement=True)   (weighted: inverse frequency)
  dws_without     DistributedWeightedSampler(replacement=False)  (weighted permutation)
  dws_uniform     DistributedWeightedSampler(ones, replacement=False)   (the "none" baseline)
  torch_weighted  torch.utils.data.WeightedRandomSampler(weights, ceil(n/R))   baseline: the same
                  number of weighted draws per rank, but neither disjoint nor coordinated
  torch_dist      torch.utils.data.DistributedSampler(len n, shuffle=True)      baseline: uniform
Goal (issue 4): under 2 s and under 300 MB per rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("dws_with", "dws_without", "dws_uniform", "torch_weighted", "torch_dist")
MIX = [0.47, 0.17, 0.12, 0.11, 0.07, 0.03, 0.03]


def _rss_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")     # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def run_one(method: str, n: int, ranks: int, threads: int) -> dict:
    import numpy as np
    import torch

    from mmer_dist.data.sampler import DistributedWeightedSampler
    from mmer_dist.weighting import class_counts, class_weights, sample_weights

    torch.set_num_threads(threads)
    after_import = _rss_mb("VmRSS")
    labels = np.random.default_rng(0).choice(len(MIX), size=n, p=MIX).astype(np.int8)
    if method == "dws_uniform":
        weights = np.ones(n)
    else:
        weights = sample_weights(labels, class_weights(class_counts(labels, len(MIX)), "inverse"))
    del labels
    ns = math.ceil(n / ranks)
    before = _rss_mb("VmRSS")
    exact_peak = _reset_peak()

    t0 = time.perf_counter()
    if method.startswith("dws"):
        sampler = DistributedWeightedSampler(weights, num_replicas=ranks, rank=0, seed=0,
                                             replacement=(method == "dws_with"))
    elif method == "torch_weighted":
        sampler = torch.utils.data.WeightedRandomSampler(torch.from_numpy(weights), ns, replacement=True,
                                                         generator=torch.Generator().manual_seed(0))
    else:
        class _Len:
            def __len__(self) -> int:
                return n
        sampler = torch.utils.data.DistributedSampler(_Len(), num_replicas=ranks, rank=0, shuffle=True, seed=0)
    it = iter(sampler)
    first = next(it)
    plan_s = time.perf_counter() - t0
    peak = _rss_mb("VmHWM")

    replans = []
    for epoch in range(1, 4):            # later epochs in the same process; min = least disturbed by load
        t1 = time.perf_counter()
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        next(iter(sampler))
        replans.append(time.perf_counter() - t1)
    return {"plan_s": round(plan_s, 3), "replan_min_s": round(min(replans), 3), "peak_rss_mb": round(peak, 1),
            "plan_extra_mb": round(peak - before, 1), "rss_before_mb": round(before, 1),
            "rss_after_import_mb": round(after_import, 1),
            "per_rank_indices": ns, "exact_peak": exact_peak, "first_index": int(first)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (1: the conservative case)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_one(spec["method"], spec["n"], spec["ranks"], spec["threads"])))
        return

    import numpy
    import torch

    repo = Path(__file__).resolve().parents[1]
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for ranks in args.ranks:
        for method in args.methods:
            spec = {"method": method, "n": args.n, "ranks": ranks, "threads": args.threads}
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env, cwd=repo,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                result = {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
            else:
                result = json.loads(proc.stdout.strip().splitlines()[-1])
            line = {"bench": "sampler_plan", **spec, **result, "loadavg": round(os.getloadavg()[0], 2),
                    "goal": {"plan_s": 2.0, "peak_rss_mb": 300}, "machine": machine}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
