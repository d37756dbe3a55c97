"""Start-up time of every command's `--help`, against the interpreter alone and the imports `--help` avoids.

    .venv/bin/python benchmarks/startup.py [--repeat 5]

Each figure is a fresh subprocess (`python -m mmer_dist.cli CMD --help`), timed wall-clock; the median of
`--repeat` runs is the figure, the minimum the least disturbed one (the machine is shared: `loadavg` is
recorded). Baselines measured in the same run: `python -c pass` (the interpreter) and the heavy imports a
`--help` must not pay: torch; torch + accelerate + transformers (what train/eval/predict import);
then DeepSpeed on top of those (what every run paid before it was imported only for DeepSpeed runs:
accelerate's `unwrap_model` imported it, see mmer_dist/train/engine.py `unwrap`). Goal (issue 17):
every `--help` under 1 s. One JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASELINES = {
    "python": "pass",
    "import torch": "import torch",
    "import torch+accelerate+transformers": "import torch, accelerate, transformers.modeling_utils",
    "import torch+accelerate+transformers+deepspeed":
        "import torch, accelerate, transformers.modeling_utils, deepspeed",
}


def machine() -> dict[str, Any]:
    versions = {p: metadata.version(p) for p in ("torch", "accelerate", "transformers", "deepspeed")}
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "loadavg": round(os.getloadavg()[0], 2), "versions": versions}


def timed(argv: list[str], repeat: int) -> dict[str, float]:
    """Median and minimum wall time of `argv` over `repeat` fresh processes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3)}


def main(argv: list[str] | None = None) -> int:
    from mmer_dist.cli import COMMANDS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="fresh processes per figure (default 5)")
    args = p.parse_args(argv)
    info = machine()
    base = None
    for name, code in BASELINES.items():
        fig = timed([sys.executable, "-c", code], args.repeat)
        base = base or fig["median_s"]
        print(json.dumps({"figure": "baseline", "what": name, **fig, **info}), flush=True)
    for command in ["", *COMMANDS]:
        fig = timed([sys.executable, "-m", "mmer_dist.cli", *([command] if command else []), "--help"], args.repeat)
        print(json.dumps({"figure": "help", "command": f"mmer-dist {command} --help".replace("  ", " "), **fig,
                          "ratio_to_python": round(fig["median_s"] / base, 2), "goal_s": 1.0,
                          "ok": fig["median_s"] < 1.0, **info}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
