"""`mmer-dist embed`: run frozen encoders once over media shards, write embedding shards.

    mmer-dist embed --config meld_text_minilm_cached --shards /tmp/meld_text --out /tmp/meld_minilm
    torchrun --nproc_per_node 2 -m mmer_dist.embed --config debug --shards IN --out OUT model.text.pooling=mean
    mmer-dist train --config meld_text_minilm_cached --shards /tmp/meld_minilm --out runs/minilm

What runs: for every modality in `data.modalities`, the encoder `model.<m>` names. A kind=hf or
scratch encoder runs as configured (frozen); a kind=cached encoder runs the encoder it expects
(`mmer_dist.models.cached.source_config`: `pretrained`/`size`/`pooling`), so one preset serves both
`embed` and `train`. Encoders are built exactly as `mmer-dist train` builds them (`torch.manual_seed
(train.seed)`, then `build_model`), so random-init (debug) encoders get the very weights a frozen
training run of the same config has. Samples are decoded with the evaluation decoder (centre crop, no
augmentation): a cache cannot hold per-epoch augmentations.

What is written (OUT): per input shard `{corpus}-{split}-{i}.tar` an output shard of the same name, the
same keys in the same order, with per sample

    KEY.json            the input's KEY.json, byte for byte (label, speaker, ...)
    KEY.emb.{m}.npy     float16, [D] for model.<m>.pooling=mean|cls, [T, D] (real tokens only) for tokens

(a modality the sample lacks has no member; a sample that fails to decode or has none of the modalities
is dropped and recorded by reason). Then, like the packer (mmer_dist.shards.merge): `{shard}.stats.json`
written last per shard, the compact index and `index.json` at the end with `extra["embeddings"][m]` = the
encoder record (kind, pretrained name, source, size, pooling, layer, dim, dtype, sha256 of the weights,
config hash, stored vector/tokens), `embed.json` (the arguments; another configuration in OUT is refused)
and `skipped.json` (the input's plus this run's).

Distribution: rank r of R writes the not-yet-complete output shards i with i % R == r (listed once, on
rank 0, and broadcast): each sample is embedded exactly once and a shard's bytes depend only on its input
shard, the encoders and `data.eval_batch_size`, never on R. A killed run resumes with the same command:
complete shards (stats file present) are kept, partial ones redone.

Input behind a URL (`--shards s3://b/meld`, mmer_dist.shards.location): each rank first copies the index
and its own input shards into the node cache (data.cache_dir), one front-to-back read per shard (the
length-sorted, rank-independent batches need random access inside a shard), embeds from there and
deletes the copies. The output is always a local folder; upload it with the README's one line.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmer_dist import dist
from mmer_dist.config import Config, ConfigError, replace
from mmer_dist.jsonio import read_json
from mmer_dist.presets import load_config, to_dict
from mmer_dist.shards.merge import merge_stats, record_diff, split_lines, write_index
from mmer_dist.shards.location import Location, ShardMissing, local_output
from mmer_dist.shards.schema import (INDEX_FILE, META_EXT, SAMPLE_DTYPE, SAMPLES_DIR, SKIPPED_FILE, SampleEntry,
                                     ShardIndex, ShardStats, load_index, read_stats, stats_name, write_json_atomic)

if TYPE_CHECKING:
    import torch

EMBED_FILE = "embed.json"
EMBED_PROFILE = "embeddings"


class EmbedError(RuntimeError):
    """An embed run that cannot proceed; the message says what to do."""


@dataclass
class EmbedResult:
    """What `embed` did on this rank (index is set on rank 0 once every shard is complete)."""

    out: Path
    planned_shards: int
    written: list[str]                       # shards written by this rank now
    resumed: int                             # shards found complete (all ranks)
    samples: int                             # samples embedded by this rank now
    dropped: dict[str, int]                  # this rank's dropped samples, by reason
    seconds: float
    records: dict[str, dict[str, Any]]
    index: ShardIndex | None = None
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading the input


class _Items:
    """(index, decoded sample or Skipped, KEY.json bytes, duration) for the DataLoader workers."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any, bytes | None, float]:
        from mmer_dist.data.decode import Skipped

        sample, raw = self.dataset.load(i)          # one read of the members: the decode's and KEY.json's
        meta = None if isinstance(sample, Skipped) or raw is None else raw.get(META_EXT)
        return i, sample, meta, float(self.dataset.durations[i])


def _collate_items(items: list[tuple[int, Any, bytes | None, float]]) -> list[tuple[int, Any, bytes | None, float]]:
    return items


def embed_member(tokens: torch.Tensor) -> bytes:
    """[T, D] or [D] features -> `.npy` bytes (float16, little-endian, C order)."""
    import torch

    arr = np.ascontiguousarray(tokens.detach().to("cpu", torch.float32).numpy().astype("<f2"))
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- writing one shard


def _write_shard(out: Path, name: str, split: str, labels: list[str], rows: list[dict[str, Any]],
                 skipped: list[dict[str, Any]], modalities: tuple[str, ...]) -> None:
    """Tar to a temp file, fsync, rename, offsets, stats last (the packer's protocol and helpers)."""
    from mmer_dist.data.decode import embedding_ext
    from mmer_dist.shards.writer import write_stats, write_tar

    offsets, size, sha256 = write_tar(out, name, ((r["key"], r["members"]) for r in rows))
    counts = Counter(labels[r["label_id"]] for r in rows)
    mods = Counter(m for r in rows for m in modalities if embedding_ext(m) in r["members"])
    stats = ShardStats(
        shard=name, split=split,
        samples=[SampleEntry(r["key"], r["label_id"], offsets[r["key"]], r["duration"], r["speaker"], r["group"])
                 for r in rows],
        bytes=size, class_counts={k: counts[k] for k in labels if counts[k]},
        modalities={m: mods[m] for m in modalities if mods[m]},
        duration=round(sum(r["duration"] for r in rows), 6), skipped=skipped, sha256=sha256)
    write_stats(out, stats)


@dataclass
class _Embedder:
    """What embedding any split of the run needs: the encoders, the input and output, the progress bar."""

    model: Any
    cfg: Config
    shards_in: Path
    index_in: ShardIndex
    out: Path
    tokenizer: Any
    modalities: tuple[str, ...]
    device: Any
    bar: Any


def _embed_split(e: _Embedder, split: str, jobs: list[tuple[str, int]]) -> tuple[list[str], int, Counter]:
    """Embed this rank's shards `jobs` [(name, shard position in the split)] of one split."""
    import torch
    from torch.utils.data import DataLoader

    from mmer_dist.data.build import build_decoder
    from mmer_dist.data.collate import Collator
    from mmer_dist.data.decode import Skipped, embedding_ext
    from mmer_dist.data.shard_reader import ShardDataset

    model, cfg, shards_in, out, tokenizer, modalities, device, bar = (
        e.model, e.cfg, e.shards_in, e.out, e.tokenizer, e.modalities, e.device, e.bar)
    labels = list(e.index_in.labels)
    data_cfg = replace(cfg.data, modalities=modalities)
    dataset = ShardDataset(shards_in, split, data_cfg, build_decoder(data_cfg, tokenizer, train=False),
                           index=e.index_in)
    collate = Collator.for_tokenizer(data_cfg, tokenizer)
    b = cfg.data.eval_batch_size
    batches, owner = [], []                         # batches never cross a shard: bytes independent of ranks
    starts = np.concatenate([[0], np.cumsum(e.index_in.splits[split].sizes)]).astype(np.int64)
    for k, (name, pos) in enumerate(jobs):
        start, end = int(starts[pos]), int(starts[pos + 1])
        if dataset.shard_names[pos] != name:
            raise EmbedError(f"{shards_in}/index.json lists {dataset.shard_names[pos]} at position {pos} of split "
                             f"{split}, expected {name}; the input changed during the run: start again")
        # Batch samples of similar length (transcript bytes, then audio seconds, from the shard's stats: no
        # decoding) to cut padding (~3x faster on MELD text); a function of the shard alone: rank-independent.
        entries = read_stats(shards_in, name).samples
        order = sorted(range(start, end), key=lambda i: (entries[i - start].members.get("txt", [0, 0])[1],
                                                         entries[i - start].duration, i))
        for s in range(0, len(order), b):
            batches.append(order[s: s + b])
            owner.append(k)
        if start == end:
            batches.append([])
            owner.append(k)
    loader = DataLoader(_Items(dataset), batch_sampler=batches, collate_fn=_collate_items,
                        num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(0))
    written: list[str] = []
    n_samples, dropped = 0, Counter()
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for bi, items in enumerate(loader):
        k = owner[bi]
        good = [(i, s, meta, dur) for i, s, meta, dur in items if not isinstance(s, Skipped)]
        for i, s, _, _ in items:
            if isinstance(s, Skipped) and s.fatal:
                raise EmbedError(f"damaged input shard: {s.detail}; `mmer-dist verify {shards_in}` lists the damaged "
                                 f"shards and the command that re-packs them")
            if isinstance(s, Skipped):
                skipped.append({"key": s.key, "reason": s.reason, "path": str(shards_in / jobs[k][0]),
                                "modalities": list(modalities), "dropped": True, "detail": s.detail[:200]})
        if good:
            batch = collate([s for _, s, _, _ in good])
            batch = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
            with torch.no_grad():
                feats = {m: model.encoders[m](batch, batch_size=len(good)) for m in modalities}
            for j, (i, s, meta, dur) in enumerate(good):
                members: dict[str, bytes] = {}
                for m in modalities:
                    tokens, mask = feats[m]
                    if bool(mask[j].any()):
                        real = tokens[j][mask[j]]
                        members[embedding_ext(m)] = embed_member(real[0] if getattr(cfg.model, m).pooling != "tokens"
                                                               and real.shape[0] == 1 else real)
                if not members:
                    skipped.append({"key": s["key"], "reason": "no_modality", "path": str(shards_in / jobs[k][0]),
                                    "modalities": list(modalities), "dropped": True,
                                    "detail": f"none of {list(modalities)} present ({', '.join(s.get('degraded', [])) or 'absent'})"})
                    continue
                members[META_EXT] = meta or b"{}"
                speaker = int(dataset.samples["speaker"][i])
                rows.append({"index": i, "key": s["key"], "label_id": int(s["label"]), "members": members,
                             "duration": round(dur, 6), "speaker": dataset.speakers[speaker] if speaker >= 0 else "",
                             "group": int(dataset.samples["group"][i])})
        if bar is not None:
            bar.update(len(items))
        last_of_shard = bi + 1 == len(batches) or owner[bi + 1] != k
        if last_of_shard:
            name = jobs[k][0]
            rows.sort(key=lambda r: r["index"])           # back to the input shard's order
            _write_shard(out, name, split, labels, rows, skipped, modalities)
            written.append(name)
            n_samples += len(rows)
            dropped.update(s["reason"] for s in skipped)
            rows, skipped = [], []
    return written, n_samples, dropped


# --------------------------------------------------------------------------- the run


def _run_record(cfg: Config, source: str, index_in: ShardIndex, modalities: tuple[str, ...],
                records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything that decides the output bytes (compared on resume); `source` names the input."""
    d = to_dict(cfg.data)
    return {"input": source, "input_extra": index_in.extra, "modalities": list(modalities),
            "encoders": records, "batch_size": cfg.data.eval_batch_size,
            "decode": {k: d[k] for k in ("sample_rate", "max_audio_seconds", "video_frames", "video_size",
                                          "max_text_tokens")}}


def _check_out(out: Path, record: dict[str, Any]) -> None:
    """Create OUT, or accept it when it holds (part of) this very run; refuse anything else."""
    path = out / EMBED_FILE
    if out.exists() and not out.is_dir():
        raise EmbedError(f"--out {out} exists and is not a folder; choose another path")
    if path.exists():
        old = read_json(path, fix=f"it records the embedding settings: delete {out} and run `mmer-dist embed` again")
        if diff := record_diff(old, record, lambda v: json.dumps(v)[:300]):
            raise EmbedError(f"{out} holds embeddings made with other settings:\n" + "\n".join(diff) + "\n"
                             f"Use another --out, the same config (to resume), or delete {out}.")
    elif out.exists() and any(out.iterdir()):
        raise EmbedError(f"--out {out} is not empty and holds no {EMBED_FILE}; choose an empty or new folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)


def _merge(out: Path, shards_in: Path, index_in: ShardIndex, plan: list[tuple[str, str, int]],
           records: dict[str, dict[str, Any]], record_hash: str, source: str) -> ShardIndex:
    """index.json (same splits and shard order as the input) and skipped.json, from the stats files."""
    labels = list(index_in.labels)
    merged = merge_stats(out, [(split, name) for split, name, _ in plan], labels, list(index_in.splits))
    dropped = merged.dropped
    from mmer_dist.models.cached import EMBEDDINGS_KEY

    index = merged.index(index_in.corpus, EMBED_PROFILE, index_in.group_unit,
                         extra={EMBEDDINGS_KEY: records, "embed_hash": record_hash, "input": source,
                                "input_profile": index_in.profile, "input_extra": index_in.extra})
    skipped = shards_in / SKIPPED_FILE
    before = read_json(skipped, fix="re-run the `mmer-dist pack` that wrote it") if skipped.exists() else {}
    total = Counter(before.get("dropped", {})) + dropped
    write_json_atomic(out / SKIPPED_FILE, {
        "dropped": dict(sorted(total.items())), "degraded": before.get("degraded", {}),
        "total_dropped": sum(total.values()), "total_degraded": before.get("total_degraded", 0),
        "embed": {"dropped": dict(sorted(dropped.items())), "files": merged.files}, "input": before})
    write_index(out, index, merged.samples)        # index.json last: the folder is complete
    return index


def _local_input(location: Location, index: ShardIndex, shards: list[str], main: bool) -> Path:
    """The input folder to read `shards` from: the shards folder itself, or, behind a URL, a node-local copy of
    the index and of this rank's input shards (each fetched once, front to back; see the module docstring)."""
    if location.is_local:
        return location.root
    names = [INDEX_FILE, *(f"{SAMPLES_DIR}/{split}/{f}.npy" for split in index.splits for f in SAMPLE_DTYPE.names),
             *(n for name in shards for n in (name, stats_name(name)))]
    folder = location.cached(names, index.sha256)
    if main and not (folder / SKIPPED_FILE).exists():
        try:                                              # the input's skip report, carried into the output's
            location.copy_to(SKIPPED_FILE, folder / SKIPPED_FILE)
        except ShardMissing:
            pass
    return folder


def _drop_copies(location: Location, folder: Path, shards: list[str]) -> None:
    """Delete this rank's local copies of input shards (the index copy stays for the loaders)."""
    if not location.is_local:
        for name in shards:
            for n in (name, stats_name(name)):
                (folder / n).unlink(missing_ok=True)


def embed(cfg: Config, shards_in: str | Path, out: str | Path, *, progress: bool = True) -> EmbedResult:
    """Embed the media shards `shards_in` into `out` on this process's share (see the module docstring)."""
    import torch
    from tqdm.auto import tqdm

    from mmer_dist.models import build_tokenizer
    from mmer_dist.models.cached import EMBEDDINGS_KEY
    from mmer_dist.models.frozen import build_frozen_encoders
    from mmer_dist.shards.writer import is_complete

    t0 = time.perf_counter()
    from mmer_dist.data.build import shards_location

    location, out = shards_location(cfg.data, shards_in), local_output(out)
    source = str(location.root.resolve()) if location.is_local else location.shown()
    info = dist.init_process_group()
    index_in = load_index(location)
    if EMBEDDINGS_KEY in index_in.extra:
        raise EmbedError(f"{location} already holds embeddings (made by `mmer-dist embed`); embed the media "
                         f"shards it was made from ({index_in.extra.get('input', '?')})")
    held = {m for si in index_in.splits.values() for m, n in si.modalities.items() if n}
    modalities = tuple(cfg.data.modalities)
    missing = [m for m in modalities if m not in held]
    if missing:
        raise EmbedError(f"data.modalities={list(modalities)} but {location} holds no {', '.join(missing)} "
                         f"(it holds {', '.join(sorted(held)) or 'nothing'}); set data.modalities="
                         f"[{','.join(m for m in modalities if m in held)}]")
    model, records = build_frozen_encoders(cfg.model, cfg.data, cfg.train.seed, modalities, len(index_in.labels))
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    tokenizer = build_tokenizer(model.encoders["text"].cfg) if "text" in modalities else None
    record = _run_record(cfg, source, index_in, modalities, records)
    record_hash = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    t_setup = time.perf_counter() - t0

    plan = [(split, name, pos) for split, si in index_in.splits.items() for pos, name in enumerate(si.shards)]
    if dist.is_main():
        _check_out(out, record)
        for leftover in out.glob(".*.tmp*"):      # a killed run's partial files (no rank is writing yet)
            leftover.unlink(missing_ok=True)
        todo = [p for p in plan if not is_complete(out, p[1])]
    else:
        todo = None
    todo = dist.broadcast_object(todo)             # one list for every rank, made before anyone writes
    if not dist.is_main():
        _check_out(out, record)                     # now exists: verifies the same settings on every rank
    mine = todo[info.rank::info.world_size]
    shards_in = _local_input(location, index_in, [name for _, name, _ in mine], dist.is_main())
    sizes = {(split, name): si.sizes[pos] for split, name, pos in plan for si in [index_in.splits[split]]}
    bar = tqdm(total=sum(sizes[(s, n)] for s, n, _ in mine), desc=f"embed {','.join(modalities)}", unit="sample",
               disable=not (progress and dist.is_main()), dynamic_ncols=sys.stderr.isatty(),
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    written, n_samples, dropped = [], 0, Counter()
    embedder = _Embedder(model, cfg, shards_in, index_in, out, tokenizer, modalities, device, bar)
    t1 = time.perf_counter()
    for split in index_in.splits:
        jobs = [(name, pos) for s, name, pos in mine if s == split]
        if jobs:
            w, n, d = _embed_split(embedder, split, jobs)
            written += w
            n_samples += n
            dropped.update(d)
    bar.close()
    t_embed = time.perf_counter() - t1
    dist.barrier()
    index = None
    if dist.is_main() and all(is_complete(out, name) for _, name, _ in plan):
        index = _merge(out, shards_in, index_in, plan, records, record_hash, source)
    dist.barrier()
    _drop_copies(location, shards_in, [name for _, name, _ in mine])
    return EmbedResult(out=out, planned_shards=len(plan), written=written, resumed=len(plan) - len(todo),
                       samples=n_samples, dropped=dict(dropped), seconds=time.perf_counter() - t0, records=records,
                       index=index, timings={"setup": round(t_setup, 3), "embed": round(t_embed, 3)})


def summary(res: EmbedResult) -> str:
    """What was written and how to train on it."""
    from mmer_dist.models.cached import cached_overrides, describe_record

    lines = [f"{res.out}: {res.planned_shards} shards planned, {len(res.written)} written now by this rank "
             f"({res.samples} samples), {res.resumed} already complete, {res.seconds:.1f} s "
             f"(setup {res.timings.get('setup', 0):.1f} s, embedding {res.timings.get('embed', 0):.1f} s)"]
    for m, r in res.records.items():
        lines.append(f"  {m}: {describe_record(r)}, stored as {r['stored']}")
    if res.dropped:
        lines.append("  dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(res.dropped.items())))
    if res.index is not None:
        lines += split_lines(res.index)
        lines.append("train on them with a config whose encoders are cached, e.g. overrides: "
                     + " ".join(cached_overrides(m, r) for m, r in res.records.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmer-dist embed",
                                description="Run the frozen encoders of a config once over media shards and write embedding "
                                   "shards (same keys and splits) to train kind=cached models on. Resumable: run the "
                                   "same command again; with torchrun -m mmer_dist.embed each rank embeds its shards.")
    p.add_argument("--config", required=True, help="preset name or YAML naming the encoders")
    p.add_argument("--shards", required=True, help="media shards folder or URL (s3://, gs://, http(s)://, file://, "
                                                   "pipe:CMD with {shard}; each rank copies its input shards first)")
    p.add_argument("--out", required=True, help="embedding shards folder (local; upload it afterwards: README)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.text.pooling=mean")
    return p


def main(argv: list[str] | None = None) -> int:
    """`mmer-dist embed` and `python -m mmer_dist.embed` (for torchrun / accelerate launch -m): config +
    overrides -> `embed`, summary on the main rank."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, list(args.overrides or []))
        res = embed(cfg, args.shards, args.out)
    except (ConfigError, EmbedError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"mmer-dist embed: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    if dist.is_main():
        print(summary(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
