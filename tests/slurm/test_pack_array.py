"""slurm/pack.sbatch on the test cluster: a 4-task job array plus the dependent merge job gives the bytes of a
1-process pack; an element cancelled mid-way and resubmitted alone rewrites only its missing shards, and
the merge refuses, naming them, until then."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

PACK = ["--shard-samples", "4", "--video-size", "32", "--video-fps", "4"]
SITE = ["--cpus-per-task=1", "--mem-per-cpu=400M"]        # site flags on the command line, as documented
TASKS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, slurm: Any) -> tuple[Path, Path]:
    """(raw MELD-layout corpus of 120 clips, its 1-process pack) made with the real CLI."""
    work = tmp_path_factory.mktemp("pack")
    raw, ref = work / "raw", work / "ref"
    slurm.run("mmer-dist", "synth", "meld", "--out", str(raw), "--n", "120", timeout=120)
    slurm.run("mmer-dist", "pack", "meld", "--root", str(raw), "--out", str(ref), *PACK, timeout=300)
    return raw, ref


def _files(d: Path) -> dict[str, bytes]:
    """Every file of a shards folder but the per-task lock files."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".lock-")}


def _identity(d: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every shard tar and stats file: what a rewrite changes."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.iterdir()
            if p.name.endswith((".tar", ".stats.json"))}


def _submit(slurm: Any, logs: Path, raw: Path, out: Path, *extra: str, array: str = f"0-{TASKS - 1}",
            after: str = "") -> str:
    dep = [f"--dependency=afterok:{after}"] if after else []
    return slurm.sbatch(f"--array={array}", *dep, *SITE, f"--output={logs}/%x-%A_%a.out", "slurm/pack.sbatch",
                        "meld", "--root", str(raw), "--out", str(out), *PACK, *extra)


def test_job_array_and_merge_job_equal_a_local_pack(slurm: Any, corpus: tuple[Path, Path], tmp_path: Path) -> None:
    raw, ref = corpus
    out = tmp_path / "shards"
    array = _submit(slurm, tmp_path, raw, out)
    merge = _submit(slurm, tmp_path, raw, out, "--merge-only", array="0", after=array)
    states = {j["ArrayTaskId"]: j["JobState"] for j in slurm.wait(array)}
    assert states == {str(t): "COMPLETED" for t in range(TASKS)}
    assert slurm.wait(merge)[0]["JobState"] == "COMPLETED"
    assert _files(out) == _files(ref)                        # byte for byte, index.json and plan.json included
    print(*(f"job {j} states seen: {', '.join(slurm.history[j])}" for j in (array, merge)), sep="\n")
    written = [json.loads(p.read_text())["shard"] for p in out.glob("*.stats.json")]
    assert len(written) == len(json.loads((ref / "plan.json").read_text())["shards"]) == 31


def _task_shards(out: Path, task: int) -> list[str]:
    shards = json.loads((out / "plan.json").read_text())["shards"]
    return [s["name"] for i, s in enumerate(shards) if i % TASKS == task]


def _cancel_mid_way(slurm: Any, array: str, out: Path, task: int) -> None:
    """scancel element `task` once it has written some but not all of its shards."""
    deadline = time.time() + 120
    while not (out / "plan.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    mine = _task_shards(out, task)
    while time.time() < deadline:
        done = sum((out / n.replace(".tar", ".stats.json")).exists() for n in mine)
        if done >= 1:
            slurm.run("scancel", f"{array}_{task}")
            return
        time.sleep(0.005)
    raise TimeoutError(f"task {task} wrote no shard in 120 s")


def test_cancelled_task_resubmitted_writes_only_its_missing_shards(slurm: Any, corpus: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    raw, ref = corpus
    out = tmp_path / "shards"
    array = _submit(slurm, tmp_path, raw, out)
    _cancel_mid_way(slurm, array, out, task=1)
    states = {j["ArrayTaskId"]: j["JobState"] for j in slurm.wait(array)}
    assert states == {"0": "COMPLETED", "1": "CANCELLED", "2": "COMPLETED", "3": "COMPLETED"}
    mine = _task_shards(out, 1)
    before = _identity(out)
    kept = [n for n in mine if n.replace(".tar", ".stats.json") in before]
    assert 1 <= len(kept) < len(mine), f"task 1 was not cancelled mid-way: {len(kept)} of {len(mine)} shards done"
    assert not (out / "index.json").exists()

    merge = _submit(slurm, tmp_path, raw, out, "--merge-only", array="0")      # too early: refused
    assert slurm.wait(merge)[0]["JobState"] == "FAILED"
    log = (tmp_path / f"mmer-pack-{merge}_0.out").read_text()
    missing = [n for n in mine if n not in kept]
    assert f"{len(missing)} of 31 planned shards in {out} are not complete yet" in log and missing[0] in log

    again = _submit(slurm, tmp_path, raw, out, "--num-tasks", str(TASKS), array="1")   # just that element
    merge = _submit(slurm, tmp_path, raw, out, "--merge-only", array="0", after=again)
    assert slurm.wait(again)[0]["JobState"] == "COMPLETED"
    assert slurm.wait(merge)[0]["JobState"] == "COMPLETED"
    after = _identity(out)
    rewritten = sorted(n for n in after if before.get(n) != after[n])
    assert rewritten == sorted(f for n in missing for f in (n, n.replace(".tar", ".stats.json")))
    assert _files(out) == _files(ref)
    print(*(f"job {j} states seen: {', '.join(h)}" for j, h in slurm.history.items()), sep="\n")
