"""`mmer-dist pack`: raw corpus -> WebDataset shards + index, parallel, resumable, Slurm-ready.

    mmer-dist pack meld --root /data/MELD.Raw --out shards/out/meld --workers 8
    mmer-dist pack ravdess --root /data/RAVDESS --out shards/out/ravdess --profile raw

    from mmer_dist.shards.pack import pack
    result = pack("meld", root, out, workers=2)

How it works (each step deterministic, so the output bytes never depend on --workers or on
how often the job was interrupted):

1. Read: `mmer_dist.corpora.read_corpus` turns the raw folder into `Utterance` records and a
   `ReadReport` (what the reader dropped or degraded).
2. Plan (mmer_dist/shards/plan.py): per split, utterances sorted by key are shuffled with `random.Random(f"{seed}:{split}")`
   and cut into shards of at most `shard_samples` samples and at most `shard_bytes` *planned*
   bytes. The planned size of a sample is the size of its source files on disk plus its
   transcript plus 3 KiB of tar headers and metadata: it is known before any transcoding, so the
   plan (which sample goes in which shard) is fixed up front. With the train profile the shards
   come out smaller than `shard_bytes` (transcoded media is smaller than the source); with the raw
   profile they match it closely. A shard is the unit of work. The first task records the plan in
   `plan.json` (keys and planned sizes per shard, with a digest); every other task, resumed run and
   merge must compute the same one, or is refused with the differences named. After planning a
   task keeps only the plan and the Utterance objects of its own shards.
3. Write (mmer_dist/shards/writer.py): each shard (one worker process writes whole shards) goes to `.NAME.tmpPID`, is
   fsynced and renamed into place; then the byte offset and size of every member is read back
   with `tarfile` and `NAME.stats.json` is written atomically, last. A shard is complete iff its
   stats file exists (and its tar, unless every sample of it was skipped: then no tar is written).
4. Merge: once every planned shard is complete, each shard's stats are checked against the plan
   (the keys it holds plus the ones it dropped are exactly its planned keys, in order) and merged
   into `index.json` (`ShardIndex`) and `skipped.json` (reader report + media failures, by reason,
   with names). The folder is listed once per phase, so 10^4-10^5 shards cost O(shards).

Resume: run the same command again. Complete shards are kept, temp files and tars without stats
are deleted and redone. `pack.json` holds the arguments and reader options (and their hash); an
output folder made with other arguments is refused, naming the differences, unless --overwrite.

Bad input: a media file that is missing, unreadable, empty, truncated or corrupt is never fatal.
With `missing_media="keep"` (default) the sample is kept without that modality ("degraded"); with
"skip" it is dropped. A sample left with no modality at all is dropped in either case. Everything
is counted by reason in `skipped.json` and the final summary; the exit code is 0 unless --strict.

Job arrays (Slurm): `--task-id t --num-tasks T` (default $SLURM_ARRAY_TASK_ID / _COUNT) writes
only the planned shards i with i % T == t; the task that finds every shard complete merges, and
`--merge-only` merges as a separate (dependent) job. With an explicit `--num-tasks T` the task id
defaults to $SLURM_ARRAY_TASK_ID itself, so one task can be resubmitted alone
(`sbatch --array=1 slurm/pack.sbatch ... --num-tasks 4`). See slurm/pack.sbatch.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmer_dist.corpora import read_corpus
from mmer_dist.corpora.labels import labels_for
from mmer_dist.corpora.record import ReadReport
from mmer_dist.jsonio import read_json
from mmer_dist.shards import media
from mmer_dist.shards.location import local_output
from mmer_dist.shards.merge import merge_pack, record_diff, split_lines
from mmer_dist.shards.plan import (
    PackConfig, PackError, Plan, ShardJob, parse_bytes, plan_shards, reader_options_for, record_plan,
)
from mmer_dist.shards.schema import (
    INDEX_FILE, PACK_FILE, PLAN_FILE, SAMPLES_DIR, SKIPPED_FILE, ShardIndex, write_json_atomic,
)
from mmer_dist.shards.writer import (
    ShardOutcome, WriteSpec, complete_shards, list_folder, remove_leftovers, write_shard,
)


# --------------------------------------------------------------------------- worker processes

# worker-process globals (set by the pool initializer)
_QUEUE: Any = None


def _init_worker(queue: Any, parent: int) -> None:
    global _QUEUE
    _QUEUE = queue
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this worker when the packing process dies (even by SIGKILL), so no orphan keeps
    writing a shard while the pack is resumed."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:     # the parent died before prctl took effect
        os._exit(1)


class _TaskLock:
    """An exclusive flock on OUT/.lock-task{t}of{T}: two packs of the same task never run at once.

    The kernel drops the lock when its process dies (SIGKILL included), so it never goes stale.
    """

    def __init__(self, out: Path, task_id: int, num_tasks: int) -> None:
        import fcntl

        self.path = out / f".lock-task{task_id}of{num_tasks}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise PackError(f"another pack ({holder or 'unknown pid'}) is writing task {task_id} of {num_tasks} "
                            f"into {out}; wait for it to finish or stop it, then run again") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)

    def release(self) -> None:
        os.close(self.fd)       # closing drops the flock; the file stays (unlinking it would race)


def write_shard_in_worker(job: ShardJob, spec: WriteSpec) -> ShardOutcome:
    """`write_shard` in a pool process, reporting progress through the queue to the main process."""
    return write_shard(job, spec, progress=_QUEUE.put)


# --------------------------------------------------------------------------- the pack


@dataclass
class PackResult:
    """What `pack` did; `index` is None when this task did not merge (other tasks still running)."""

    out: Path
    config: PackConfig
    planned_shards: int
    written: list[str]
    resumed: list[str]              # shards found complete and kept
    failed: dict[str, str]          # shard -> error (left incomplete; rerun to retry)
    index: ShardIndex | None
    dropped: dict[str, int]         # reason -> inputs dropped (reader + media), complete only after merge
    degraded: dict[str, int]
    samples_written: int
    seconds: float
    timings: dict[str, float]       # seconds per phase: read (corpus reader), plan, write, merge
    peak_rss_mb: float              # max over worker processes (or this process with workers=1)


def _check_out(out: Path, cfg: PackConfig, overwrite: bool, num_tasks: int) -> None:
    """Create `out`, or accept it when made with the same config; refuse otherwise."""
    pack_file = out / PACK_FILE
    ours = lambda p: p.name in (INDEX_FILE, PACK_FILE, PLAN_FILE, SKIPPED_FILE, SAMPLES_DIR) or (  # noqa: E731
        p.name.lstrip(".").startswith(f"{cfg.corpus}-") and (".tar" in p.name or ".stats.json" in p.name))
    if out.exists() and not out.is_dir():
        raise PackError(f"--out {out} exists and is not a folder; choose another path")
    existing = [p for p in out.iterdir()] if out.exists() else []
    diff: list[str] = []
    if existing:
        if pack_file.exists():
            old = read_json(pack_file, fix=f"pack into a new --out, or add --overwrite to re-pack {out}").get("config", {})
            new = cfg.to_json()
            diff = record_diff(old, new)
            if diff and not overwrite:
                lines = "\n".join(diff)
                raise PackError(f"{out} holds shards packed with other arguments:\n{lines}\n"
                                f"Use another --out, the same arguments (to resume), or --overwrite to delete them.")
        elif any(ours(p) for p in existing) and not overwrite:
            raise PackError(f"{out} holds shard files but no {PACK_FILE} (not made by this packer or damaged); "
                            f"use another --out or --overwrite to delete them")
        if overwrite and (not pack_file.exists() or diff):
            if num_tasks > 1:
                raise PackError("--overwrite is not allowed in a job array (tasks would delete each other's "
                                "shards); clear the folder once, then start the array")
            for p in existing:
                if ours(p):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": cfg.to_json(), "hash": cfg.digest(),
              "versions": {"av": media.av.__version__, "libavcodec": list(media.av.library_versions["libavcodec"]),
                           "python": sys.version.split()[0]}}
    if not pack_file.exists():
        write_json_atomic(pack_file, record)


def _task_from_env(task_id: int | None, num_tasks: int | None) -> tuple[int, int]:
    """(task id, number of tasks): the flags, else the job array's. The task id is the array index minus
    the array's first index, or, when --num-tasks is given, the array index itself (so that
    `sbatch --array=1 ... --num-tasks 4` redoes task 1 of 4 alone)."""
    env = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task_id is None and env is not None and num_tasks is not None:
        task_id = int(env)
    if num_tasks is None:
        num_tasks = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1") or 1)
    if task_id is None:
        if env is not None and num_tasks > 1:
            task_id = int(env) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        else:
            task_id = 0
    if not 0 <= task_id < num_tasks:
        raise PackError(f"--task-id {task_id} must be in 0..{num_tasks - 1} (--num-tasks {num_tasks})")
    return task_id, num_tasks


def pack(corpus: str, root: str | Path, out: str | Path, *, profile: str = "train", workers: int = 1,
         shard_samples: int = 1000, shard_bytes: int | str = "1GB", seed: int = 0,
         splits: list[str] | tuple[str, ...] | None = None, video_size: int = 224, video_fps: float = 8.0,
         video_crf: int = 23, missing_media: str = "keep", reader_options: dict[str, Any] | None = None,
         task_id: int | None = None, num_tasks: int | None = None, merge_only: bool = False,
         overwrite: bool = False, progress: bool = True) -> PackResult:
    """Pack `corpus` at `root` into shards in `out` (see the module docstring). Resumable."""
    t0 = time.perf_counter()
    out = local_output(out)             # a URL is refused with the one-line upload (mmer_dist.shards.location)
    task_id, num_tasks = _task_from_env(task_id, num_tasks)
    split_t = tuple(splits or ())
    cfg = PackConfig(corpus=corpus, root=str(Path(root).resolve()), profile=profile, shard_samples=shard_samples,
                     shard_bytes=parse_bytes(shard_bytes), seed=seed, splits=split_t, video_size=video_size,
                     video_fps=float(video_fps), video_crf=video_crf, missing_media=missing_media,
                     reader_options=reader_options_for(corpus, split_t, missing_media, reader_options))
    plan, mine, report, timings = _read_and_plan(cfg, None if merge_only else (task_id, num_tasks))
    lock = _open_out(out, cfg, plan, merge_only, overwrite, task_id, num_tasks)
    spec = WriteSpec(out=str(out), root=cfg.root, corpus=corpus, labels=labels_for(corpus), profile=profile,
                      video_size=cfg.video_size, video_fps=cfg.video_fps, video_crf=cfg.video_crf,
                      sample_rate=cfg.sample_rate, missing_media=missing_media)
    t_write = time.perf_counter()
    try:
        listing = list_folder(out)                    # once: no stat or glob per shard
        done = complete_shards(out, [j.name for j in mine], listing)
        remove_leftovers(out, [j.name for j in mine], listing)   # temp files of killed runs (our shards only)
        resumed = [j for j in mine if j.name in done]
        todo = [j for j in mine if j.name not in done]
        outcomes = _run(todo, spec, workers, progress, total=sum(len(j.utterances) for j in mine),
                        done=sum(len(j.utterances) for j in resumed), desc=f"pack {corpus} {profile}")
    finally:
        if lock is not None:
            lock.release()
    timings["write"] = time.perf_counter() - t_write
    t_merge = time.perf_counter()
    index = None
    names = [s.name for s in plan.shards]
    if merge_only or len(complete_shards(out, names, list_folder(out))) == len(names):
        index = merge_pack(out, plan, cfg, report)    # merge_only: PackError when incomplete
    dropped, degraded = _counts(out, report, outcomes, merged=index is not None)
    timings["merge"] = time.perf_counter() - t_merge
    return PackResult(
        out=out, config=cfg, planned_shards=len(plan.shards), written=[o.name for o in outcomes if not o.error],
        resumed=[j.name for j in resumed], failed={o.name: o.error for o in outcomes if o.error}, index=index,
        dropped=dict(dropped), degraded=dict(degraded), samples_written=sum(o.samples for o in outcomes),
        seconds=time.perf_counter() - t0, timings={k: round(v, 4) for k, v in timings.items()},
        peak_rss_mb=max([o.peak_rss_mb for o in outcomes] or [0.0]),
    )


def _read_and_plan(cfg: PackConfig, task: tuple[int, int] | None
                   ) -> tuple[Plan, list[ShardJob], ReadReport, dict[str, float]]:
    """Read the corpus and plan it: (the whole plan, the ShardJobs of task (t, T) -- none for a merge --,
    the reader's report, timings). Only this task's Utterance objects outlive this function."""
    t0 = time.perf_counter()
    utterances, report = read_corpus(cfg.corpus, cfg.root, **cfg.reader_options)
    timings = {"read": time.perf_counter() - t0}
    if cfg.splits:
        unknown = sorted(set(cfg.splits) - {u.split for u in utterances})
        if unknown:
            raise PackError(f"--splits {','.join(cfg.splits)}: no utterances in split(s) {unknown}; "
                            f"present: {sorted({u.split for u in utterances})}")
        utterances = [u for u in utterances if u.split in cfg.splits]
    jobs = plan_shards(utterances, cfg.corpus, cfg.seed, cfg.shard_samples, cfg.shard_bytes)
    plan = Plan.from_jobs(cfg.digest(), jobs)
    mine = [j for j in jobs if task is not None and j.index % task[1] == task[0]]
    timings["plan"] = time.perf_counter() - t0 - timings["read"]
    return plan, mine, report, timings


def _open_out(out: Path, cfg: PackConfig, plan: Plan, merge_only: bool, overwrite: bool, task_id: int,
              num_tasks: int) -> _TaskLock | None:
    """Check (or create) the output folder and the recorded plan; the task's lock (None for a merge)."""
    if merge_only:
        if not (out / PACK_FILE).exists():
            raise PackError(f"--merge-only: {out} has no {PACK_FILE}; run the pack first")
        _check_out(out, cfg, overwrite=False, num_tasks=num_tasks)
        record_plan(out, plan, cfg.root)
        return None
    if out.exists() and not out.is_dir():
        raise PackError(f"--out {out} exists and is not a folder; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    lock = _TaskLock(out, task_id, num_tasks)      # before --overwrite may delete anything
    try:
        _check_out(out, cfg, overwrite, num_tasks)
        record_plan(out, plan, cfg.root)
    except BaseException:
        lock.release()
        raise
    return lock


def _counts(out: Path, report: ReadReport, outcomes: list[ShardOutcome], merged: bool) -> tuple[Counter, Counter]:
    """(dropped, degraded) by reason: the whole pack's from skipped.json after a merge, else this task's."""
    if merged:
        sk = read_json(out / SKIPPED_FILE, fix="re-run the same `mmer-dist pack` command: it is merged again")
        return Counter(sk["dropped"]), Counter(sk["degraded"])
    dropped, degraded = Counter(report.skipped), Counter(report.degraded)
    for o in outcomes:
        for s in o.skipped:
            (dropped if s["dropped"] else degraded)[s["reason"]] += 1
    return dropped, degraded


def _run(jobs: list[ShardJob], spec: WriteSpec, workers: int, progress: bool, total: int, done: int,
         desc: str) -> list[ShardOutcome]:
    """Write `jobs` in this process (workers=1) or a pool of spawned processes; tqdm in this one."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()      # in a Slurm log: a line every 30 s, not a carriage-return stream
    bar = tqdm(total=total, initial=done, desc=desc, unit="sample", disable=not progress or not jobs,
               dynamic_ncols=tty, mininterval=0.5 if tty else 30.0, smoothing=0.1)
    outcomes: list[ShardOutcome] = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                outcomes.append(write_shard(job, spec, progress=bar.update))
            return outcomes
        ctx = mp.get_context("spawn")    # no fork of a process holding threads (tqdm, FFmpeg)
        queue = ctx.Queue()

        def drain() -> None:
            while (n := queue.get()) is not None:
                bar.update(n)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        # ProcessPoolExecutor, not multiprocessing.Pool: a worker killed by the OS (OOM) breaks the
        # pool with an error here instead of hanging; its shards stay incomplete for the next run.
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(queue, os.getpid())) as pool:
            futures = {pool.submit(write_shard_in_worker, j, spec): j for j in jobs}
            for fut in as_completed(futures):
                try:
                    outcomes.append(fut.result())
                except BrokenProcessPool as e:
                    outcomes.append(ShardOutcome(futures[fut].name, error=f"worker process died: {e}"))
        queue.put(None)
        reader.join(timeout=10)
        return outcomes
    finally:
        bar.close()


# --------------------------------------------------------------------------- CLI


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmer-dist pack",
                                description="Read a raw corpus and write {corpus}-{split}-{000000}.tar shards, "
                                   "index.json, per-shard stats and skipped.json. Resumable: run the same "
                                   "command again after an interruption.")
    p.add_argument("corpus", choices=["meld", "ravdess"])
    p.add_argument("--root", required=True,
                   help="MELD: folder with the CSVs and, optionally, the clip folders (without clips: "
                        "text-only shards); RAVDESS: folder with Actor_XX folders")
    p.add_argument("--out", required=True, help="output shards folder (local or cluster filesystem; to serve it "
                                                "from a bucket, upload it afterwards: README, 'Shards by URL')")
    p.add_argument("--profile", choices=["train", "raw"], default="train",
                   help="train: mono 16 kHz FLAC + downscaled mp4 (default); raw: original bytes")
    p.add_argument("--workers", type=int, default=1, help="parallel packing processes (output is identical for any N)")
    p.add_argument("--shard-samples", type=int, default=1000, help="max samples per shard")
    p.add_argument("--shard-bytes", type=str, default="1GB", help="max bytes per shard (e.g. 500MB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the deterministic shuffle across shards")
    p.add_argument("--splits", default="", help="comma list of splits to pack (default: all found)")
    p.add_argument("--test-actors", default="", help="RAVDESS: comma list of test actors (default: last 4 present)")
    p.add_argument("--dev-actors", default="", help="RAVDESS: comma list of dev actors (default: the 2 before)")
    p.add_argument("--fold", default="", help="RAVDESS: a named actor fold instead of explicit lists")
    p.add_argument("--split", choices=["actors", "none"], default="actors",
                   help="RAVDESS: actors = train/dev/test by actor at pack time (default); none = every actor in "
                        "one split 'all', actor ids kept, folds chosen when training (data.folds=K data.fold=k)")
    p.add_argument("--video-size", type=int, default=224, help="train profile: short side of the video, pixels")
    p.add_argument("--video-fps", type=float, default=8.0, help="train profile: video frame rate")
    p.add_argument("--missing-media", choices=["keep", "skip"], default="keep",
                   help="an utterance whose clip is missing/unreadable: keep it without that modality, or skip it")
    p.add_argument("--task-id", type=int, default=None,
                   help="job-array task id (default: $SLURM_ARRAY_TASK_ID): write only this task's shards")
    p.add_argument("--num-tasks", type=int, default=None,
                   help="job-array size (default: $SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--merge-only", action="store_true", help="only merge the per-shard stats into index.json")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any input was skipped")
    p.add_argument("--overwrite", action="store_true", help="delete existing output made with other arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    """`mmer-dist pack`: run `pack` from the command line, print a summary; exit 1 on failed shards
    (or on skipped inputs with --strict)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    reader_options: dict[str, Any] = {}
    if args.corpus == "ravdess":
        reader_options = {"test_actors": _csv(args.test_actors) or None,
                          "dev_actors": _csv(args.dev_actors) or None, "fold": args.fold or None,
                          "split": None if args.split == "actors" else args.split}
    elif args.test_actors or args.dev_actors or args.fold or args.split != "actors":
        print("error: --test-actors/--dev-actors/--fold/--split apply to RAVDESS only", file=sys.stderr)
        return 2
    try:
        res = pack(args.corpus, args.root, args.out, profile=args.profile, workers=args.workers,
                   shard_samples=args.shard_samples, shard_bytes=args.shard_bytes, seed=args.seed,
                   splits=_csv(args.splits), video_size=args.video_size, video_fps=args.video_fps,
                   missing_media=args.missing_media, reader_options=reader_options, task_id=args.task_id,
                   num_tasks=args.num_tasks, merge_only=args.merge_only, overwrite=args.overwrite,
                   progress=True)
    except (PackError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(res))
    if res.failed:
        return 1
    if args.strict and (res.dropped or res.degraded):
        print("--strict: inputs were skipped or degraded (see skipped.json); exiting with 1", file=sys.stderr)
        return 1
    return 0


def summary(res: PackResult) -> str:
    """A few lines for the terminal: what was written, resumed, skipped, merged."""
    lines = [f"{res.out}: {res.planned_shards} shards planned, {len(res.written)} written now "
             f"({res.samples_written} samples), {len(res.resumed)} already complete, "
             f"{res.seconds:.1f} s, peak worker RSS {res.peak_rss_mb:.0f} MB"]
    if res.index is not None:
        lines += split_lines(res.index)
    else:
        lines.append("  not merged yet: other tasks' shards are missing; run `mmer-dist pack ... --merge-only` "
                     "after they finish")
    for name, counts in (("dropped", res.dropped), ("degraded (kept without a modality)", res.degraded)):
        if counts:
            lines.append(f"  inputs {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for shard, err in res.failed.items():
        lines.append(f"  FAILED {shard}: {err.splitlines()[0]} (left incomplete; run the same command again)")
    return "\n".join(lines)
