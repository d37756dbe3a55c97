"""The sampler across real processes: 2 and 3 ranks over gloo on CPU.

Each rank is a subprocess running this file (`python tests/smoke/test_sampler_dist.py OUT`) with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set as torchrun would, joins the group through
`mmer_dist.dist.init_process_group`, draws with world size and rank taken from `mmer_dist.dist`,
and all_gathers what it drew; rank 0 writes the gathered result, which the test checks.

    .venv/bin/pytest tests/smoke/test_sampler_dist.py -q
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
N = 6007                      # not divisible by 2 or 3: padding on the without-replacement path
SEED = 13
BATCH = 32
RESUME_BATCHES = 5
MIX = [0.47, 0.17, 0.12, 0.11, 0.07, 0.03, 0.03]


def _dataset() -> tuple[np.ndarray, np.ndarray]:
    from mmer_dist.weighting import class_counts, class_weights, sample_weights

    y = np.random.default_rng(0).choice(len(MIX), size=N, p=MIX)
    return y, sample_weights(y, class_weights(class_counts(y, len(MIX)), "inverse"))


def _worker(out: Path) -> None:
    from mmer_dist import dist
    from mmer_dist.data.sampler import DistributedWeightedSampler, eval_indices

    dist.init_process_group(timeout_s=120)
    _, w = _dataset()
    mine: dict = {"rank": dist.rank(), "world": dist.world_size()}
    for replacement in (True, False):
        tag = "with" if replacement else "without"
        s = DistributedWeightedSampler(w, seed=SEED, replacement=replacement)   # world from mmer_dist.dist
        s.set_epoch(0)
        e0 = list(s)
        again = list(DistributedWeightedSampler(w, seed=SEED, replacement=replacement))
        s.set_epoch(1)
        e1 = list(s)
        # interrupted run: trains RESUME_BATCHES batches of epoch 1, checkpoints; a fresh process resumes
        run = DistributedWeightedSampler(w, seed=SEED, replacement=replacement)
        run.set_epoch(1)
        seen = []
        for i in run:
            seen.append(i)
            if len(seen) % BATCH == 0:
                run.advance(BATCH)
                if len(seen) == RESUME_BATCHES * BATCH:
                    break
        state = json.loads(json.dumps(run.state_dict()))
        fresh = DistributedWeightedSampler(w, seed=SEED, replacement=replacement)
        fresh.load_state_dict(state)
        fresh.set_epoch(1)
        mine[tag] = {"e0": e0, "again": again, "e1": e1, "seen": seen, "rest": list(fresh),
                     "state": state, "padding": s.is_padding().tolist(), "num_padding": s.num_padding}
    idx, pad = eval_indices(1001)
    mine["eval"] = {"idx": idx.tolist(), "pad": pad.tolist()}
    gathered = dist.all_gather_object(mine)
    if dist.rank() == 0:
        out.write_text(json.dumps(gathered))
    dist.barrier()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(world: int, out: Path) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sampler_across_processes(world, tmp_path):
    from helpers import expected_class_distribution
    from mmer_dist.data.sampler import DistributedWeightedSampler

    ranks = _launch(world, tmp_path / "gathered.json")
    assert [r["rank"] for r in ranks] == list(range(world)) and all(r["world"] == world for r in ranks)
    y, w = _dataset()
    target = expected_class_distribution(y, w, len(MIX))

    for tag, replacement in (("with", True), ("without", False)):
        parts = [r[tag] for r in ranks]
        ns = math.ceil((N if replacement else int((w > 0).sum())) / world)
        # equal lengths on every rank, in every epoch and after the resume
        assert all(len(p["e0"]) == len(p["e1"]) == ns for p in parts)
        # same (seed, epoch) -> same draw; a new epoch -> a different one
        assert all(p["e0"] == p["again"] for p in parts)
        assert all(p["e0"] != p["e1"] for p in parts)
        # the ranks' parts sit at disjoint positions r::world of one global draw, which a single
        # process reproduces from (seed, epoch) alone
        ref = DistributedWeightedSampler(w, num_replicas=world, rank=0, seed=SEED, replacement=replacement)
        for epoch, key in ((0, "e0"), (1, "e1")):
            ref.set_epoch(epoch)
            g = ref.global_indices()
            union = np.empty(ns * world, dtype=np.int64)
            for r, p in enumerate(parts):
                union[r::world] = p[key]
            assert np.array_equal(union, g), f"{tag} epoch {epoch}: ranks' parts are not the global draw"
        if replacement:
            # class frequencies of the union (both epochs) within 5 standard errors of the target
            both = np.concatenate([np.concatenate([p["e0"], p["e1"]]) for p in parts])
            freq = np.bincount(y[both], minlength=len(MIX)) / both.size
            tol = 5 * np.sqrt(target * (1 - target) / both.size)
            assert np.all(np.abs(freq - target) <= tol), (freq, target, tol)
        else:
            # without replacement: index sets disjoint across ranks apart from the flagged padding
            real = [np.array(p["e0"])[~np.array(p["padding"])] for p in parts]
            flat = np.concatenate(real)
            assert np.unique(flat).size == flat.size == N
            assert sum(len(p["padding"]) - len(rr) for p, rr in zip(parts, real)) == parts[0]["num_padding"]
            assert parts[0]["num_padding"] == ns * world - N
        # mid-epoch resume on a fresh sampler = the uninterrupted epoch
        assert all(p["state"]["position"] == RESUME_BATCHES * BATCH for p in parts)
        assert all(p["seen"] + p["rest"] == p["e1"] for p in parts)
        assert len({len(p["rest"]) for p in parts}) == 1

    ev = [r["eval"] for r in ranks]
    assert len({len(e["idx"]) for e in ev}) == 1
    real = sorted(i for e in ev for i, pad in zip(e["idx"], e["pad"]) if not pad)
    assert real == list(range(1001))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
