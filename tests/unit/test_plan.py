"""Plan once and verify: plan.json is recorded by the first task, a task with another view of the corpus
is refused with the differences named, the merge checks every shard's keys against the plan, a failed
stat is an error, a task keeps only its own Utterance objects, and one array task can be resubmitted."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest

from mmer_dist.corpora import read_corpus
from mmer_dist.corpora.record import Utterance
from mmer_dist.corpora.synthetic import write_corpus
from mmer_dist.shards.pack import PackError, _read_and_plan, _task_from_env, pack
from mmer_dist.shards.plan import PackConfig, Plan, load_plan, plan_shards, reader_options_for
from mmer_dist.shards.schema import PLAN_FILE, stats_name

SMALL = {"shard_samples": 3, "video_size": 32, "video_fps": 4.0, "progress": False}


@pytest.fixture()
def meld_root(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    write_corpus("meld", root, n=21, seed=0, min_per_split=1)
    return root


def _clip(root: Path, i: int = 0) -> Path:
    return sorted((root / "train_splits").glob("*.mp4"))[i]


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock-"))


def _text(root: Path, clip: Path) -> bytes:
    """The transcript of the utterance whose clip is `clip`, as the planner counts it (UTF-8 bytes)."""
    (u,) = [u for u in read_corpus("meld", root)[0] if u.video_path == clip]
    return u.text.encode("utf-8")


def test_first_task_records_the_plan_and_every_task_agrees(meld_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    pack("meld", meld_root, out, task_id=0, num_tasks=3, **SMALL)
    recorded = json.loads((out / PLAN_FILE).read_text())
    plan = load_plan(out)
    assert recorded["digest"] == plan.digest() and len(plan.shards) == 9
    assert sum(len(s.keys) for s in plan.shards) == 21
    before = (out / PLAN_FILE).stat()
    res = pack("meld", meld_root, out, task_id=1, num_tasks=3, **SMALL)
    after = (out / PLAN_FILE).stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)   # written once
    assert res.index is None and len(res.written) == 3


def test_a_task_with_another_view_is_refused_naming_what_differs(meld_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    pack("meld", meld_root, out, task_id=0, num_tasks=2, **SMALL)
    written = _names(out)
    grown = _clip(meld_root, 0)
    grown.write_bytes(grown.read_bytes() + b"\0" * 100)       # a source file changed size
    _clip(meld_root, 1).unlink()                               # and one disappeared
    with pytest.raises(PackError) as e:
        pack("meld", meld_root, out, task_id=1, num_tasks=2, **SMALL)
    msg = str(e.value)
    assert f"differs from the plan the first task recorded in {out / PLAN_FILE}" in msg
    size = grown.stat().st_size
    assert (f"2 utterance(s) whose planned size changed (a source file changed, appeared or went missing): "
            f"meld-train-{grown.stem} planned {size - 100 + 3072 + len(_text(meld_root, grown))} bytes, now") in msg
    assert "Restore the corpus" in msg and "new --out" in msg
    assert _names(out) == written, "the refused task wrote something"


def test_merge_checks_every_shard_against_the_plan(meld_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    pack("meld", meld_root, out, **SMALL)
    plan = load_plan(out)
    a, b = plan.shards[0], plan.shards[1]
    path = out / stats_name(a.name)
    stats = json.loads(path.read_text())
    stats["samples"][0]["key"] = b.keys[0]                   # a shard written from another plan
    path.write_text(json.dumps(stats))
    with pytest.raises(PackError) as e:
        pack("meld", meld_root, out, merge_only=True, **SMALL)
    msg = str(e.value)
    assert f"{stats_name(a.name)}: holds 1 unplanned key(s) ({b.keys[0]}); lacks 1 planned key(s) ({a.keys[0]})" in msg
    assert "Delete their .stats.json files" in msg


def test_merge_names_the_incomplete_shards_and_their_task(meld_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    pack("meld", meld_root, out, task_id=0, num_tasks=4, **SMALL)
    with pytest.raises(PackError, match=r"6 of 9 planned shards .* not complete yet \(plan position: name: "
                                        r"1: meld-train-000001.tar, 2: meld-train-000002.tar.*task i % T"):
        pack("meld", meld_root, out, merge_only=True, **SMALL)


def test_a_failed_stat_is_an_error_naming_the_file(tmp_path: Path) -> None:
    gone = tmp_path / "gone.wav"
    u = Utterance(key="k1", corpus="meld", split="train", label="joy", label_id=1, speaker="s", text="hi",
                  audio_path=gone)
    with pytest.raises(PackError, match=f"cannot stat {gone} \\(utterance k1\\).*Restore or remove the file"):
        plan_shards([u], "meld", 0, 10, 10**9)


def test_a_task_keeps_only_its_own_utterances(meld_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmer_dist.shards.pack as pack_module

    refs: list[weakref.ref] = []

    def read_and_watch(*args, **kwargs):                   # the real reader; weak references to what it returns
        utterances, report = read_corpus(*args, **kwargs)
        refs.extend(weakref.ref(u) for u in utterances)
        return utterances, report

    monkeypatch.setattr(pack_module, "read_corpus", read_and_watch)
    cfg = PackConfig(corpus="meld", root=str(meld_root), reader_options=reader_options_for("meld", (), "keep", None),
                     shard_samples=3)
    plan, mine, _, _ = _read_and_plan(cfg, (1, 4))
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert len(refs) == 21
    assert [j.index for j in mine] == [1, 5] and isinstance(plan, Plan) and len(plan.shards) == 9
    assert alive == sum(len(j.utterances) for j in mine) == len(plan.shards[1].keys) + len(plan.shards[5].keys) < 21


def test_explicit_num_tasks_takes_the_array_index_as_the_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "1")
    assert _task_from_env(None, 4) == (1, 4)                # `sbatch --array=1 ... --num-tasks 4`
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    assert _task_from_env(None, None) == (1, 4)             # `--array=5-8`: index minus the first index
