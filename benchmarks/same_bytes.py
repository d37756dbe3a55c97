"""Fingerprints of what the pipeline writes, to prove a refactor changes no byte.

    python benchmarks/same_bytes.py --out /tmp/fp-before            # before the change
    python benchmarks/same_bytes.py --out /tmp/fp-after             # after it
    diff <(grep -v seconds /tmp/fp-before/fingerprints.jsonl) <(grep -v seconds /tmp/fp-after/fingerprints.jsonl)
    python benchmarks/same_bytes.py --out /tmp/fp --demo            # also `mmer-dist demo` (~5 min)

Prints one JSON line per artefact ({"what", "sha256", ...}) and writes them to OUT/fingerprints.jsonl:
the shards of the tests' synthetic corpus (120 utterances, the tests' pack settings), embedding shards
of the debug encoders, and the exported weights of the debug preset trained like the kill+resume
tests (live weights and the weight average, map-style and streaming loader). With --demo also the
demo's shards, both exported models and their test metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TRAIN_OVERRIDES = ["data.modalities=[text,audio]", "model.fusion.dropout=0.0", "model.text.dropout=0.0",
                   "model.audio.dropout=0.0", "train.log_every=1", "optim.warmup_steps=2", "data.batch_size=8",
                   "train.epochs=2", "train.checkpoint_every=2", "train.keep_checkpoints=10"]


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def emit(out: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(out / "fingerprints.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")


def shard_files(folder: Path) -> dict[str, list[Path]]:
    return {"tars": sorted(folder.glob("*.tar")), "stats": sorted(folder.glob("*.stats.json"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="empty working folder")
    ap.add_argument("--demo", action="store_true", help="also run `mmer-dist demo` and fingerprint it (~5 min)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fingerprints.jsonl").unlink(missing_ok=True)

    from mmer_dist.corpora.synthetic import write_corpus
    from mmer_dist.shards.pack import pack

    raw, shards = out / "raw", out / "shards"
    write_corpus("meld", raw, n=120, seed=0)
    pack("meld", raw, shards, profile="train", workers=1, shard_samples=20, video_size=32, video_fps=4.0,
         progress=False)
    files = shard_files(shards)
    emit(out, {"what": "shards/tars", "sha256": sha256_files(files["tars"]), "files": len(files["tars"])})
    emit(out, {"what": "shards/stats", "sha256": sha256_files(files["stats"])})

    emb = out / "embedded"
    cmd = [sys.executable, "-m", "mmer_dist.embed", "--config", "debug", "--shards", str(shards), "--out", str(emb),
           "data.modalities=[text,audio]"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    emit(out, {"what": "embedded/tars", "sha256": sha256_files(shard_files(emb)["tars"])})

    for name, extra in (("map", []), ("map-ema", ["train.ema_decay=0.9"]), ("stream", ["data.loader=stream"])):
        run = out / "runs" / name
        t0 = time.time()
        cmd = [sys.executable, "-m", "mmer_dist.train", "--config", "debug", "--shards", str(shards),
               "--out", str(run), *TRAIN_OVERRIDES, *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = json.loads((run / "metrics.json").read_text())
        emit(out, {"what": f"train/{name}/export", "sha256": sha256_files([run / "export" / "model.safetensors"]),
                   "macro_f1": metrics["macro_f1"], "seconds": round(time.time() - t0, 1)})

    if args.demo:
        demo = out / "demo"
        subprocess.run([sys.executable, "-m", "mmer_dist.cli", "demo", "--out", str(demo)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        emit(out, {"what": "demo/shards/tars", "sha256": sha256_files(shard_files(demo / "shards")["tars"])})
        for name in ("baseline", "weighted"):
            m = json.loads((demo / "eval-test" / name / "metrics.json").read_text())
            emit(out, {"what": f"demo/{name}/export",
                       "sha256": sha256_files([demo / "runs" / name / "export" / "model.safetensors"]),
                       "test_macro_f1": m["macro_f1"], "test_weighted_f1": m["weighted_f1"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
