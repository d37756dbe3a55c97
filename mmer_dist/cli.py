"""The `mmer-dist` command line: synth | pack | inspect | train | eval | predict | compare | embed | demo.

Each subcommand parses its flags here (so `--help` is instant) and hands them to the module
that does the work, imported only when that command runs.

    mmer-dist synth meld --out /tmp/raw --n 300
    mmer-dist pack meld --root /tmp/raw --out /tmp/shards --workers 2
    mmer-dist inspect /tmp/shards
    mmer-dist train --config debug --shards /tmp/shards --out runs/debug
    mmer-dist demo
"""

from __future__ import annotations

import argparse
import sys


def _synth(args: argparse.Namespace) -> int:
    from mmer_dist.corpora.synthetic import write_corpus

    summary = write_corpus(args.corpus, args.out, n=args.n, seed=args.seed, video=not args.no_video)
    print(summary)
    return 0


def _pack(args: argparse.Namespace) -> int:
    from mmer_dist.shards.pack import pack_main

    return pack_main(args)


def _inspect(args: argparse.Namespace) -> int:
    from mmer_dist.shards.inspect import inspect_main

    return inspect_main(args)


def _train(args: argparse.Namespace) -> int:
    from mmer_dist.train.__main__ import main as train_main

    return train_main(args.rest)


def _eval(args: argparse.Namespace) -> int:
    from mmer_dist.evaluate import eval_main

    return eval_main(args)


def _predict(args: argparse.Namespace) -> int:
    from mmer_dist.predict import predict_main

    return predict_main(args)


def _compare(args: argparse.Namespace) -> int:
    from mmer_dist.report import compare_main

    return compare_main(args)


def _embed(args: argparse.Namespace) -> int:
    from mmer_dist.embed import embed_main

    return embed_main(args)


def _demo(args: argparse.Namespace) -> int:
    from mmer_dist.demo import demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmer-dist",
        description="Multimodal emotion recognition on MELD and RAVDESS: pack, stream, train, evaluate.",
        epilog="Start with `mmer-dist demo` (synthetic corpus, 2-process training, report).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a small learnable synthetic corpus in the dataset's own raw layout",
                       description="Write a synthetic corpus in MELD's (CSV + dia{D}_utt{U}.mp4) or RAVDESS's "
                                   "(Actor_XX/MM-VV-EE-II-SS-RR-AA.{wav,mp4}) raw layout. Emotion shifts the "
                                   "voice, the drawn face and the words, so every modality is learnable.")
    p.add_argument("corpus", choices=["meld", "ravdess"])
    p.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    p.add_argument("--n", type=int, default=None,
                   help="utterances (MELD: total over splits; RAVDESS: per actor is derived). Default: a small corpus")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--no-video", action="store_true", help="skip the mp4 clips (text/audio only)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("pack", help="pack a raw corpus into WebDataset shards with an index",
                       description="Read a raw corpus and write {corpus}-{split}-{000000}.tar shards, "
                                   "index.json, per-shard stats and skipped.json. Resumable: run the same "
                                   "command again after an interruption.")
    p.add_argument("corpus", choices=["meld", "ravdess"])
    p.add_argument("--root", required=True,
                   help="MELD: folder with the CSVs and, optionally, the clip folders (without clips: "
                        "text-only shards); RAVDESS: folder with Actor_XX folders")
    p.add_argument("--out", required=True, help="output shards folder")
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
    p.set_defaults(func=_pack)

    p = sub.add_parser("inspect", help="summarise a shards folder (splits, classes, modalities, skipped inputs)",
                       description="Summarise a shards folder from its index files only (never opens a tar): "
                                   "samples, classes and imbalance per split, modalities, skipped inputs by reason.")
    p.add_argument("shards", help="shards folder written by `mmer-dist pack` or `mmer-dist embed`")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the human summary")
    p.add_argument("--plots", default="", help="folder for per-split class-distribution PNGs (default: none)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("train", help="train a model (same as `python -m mmer_dist.train`)", add_help=False,
                       description="Train; see `mmer-dist train --help`.")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a run or exported model on a split of a shards folder",
                       description="Evaluate a trained model on one split: metrics.json (macro-F1 headline), "
                                   "predictions.jsonl and plots in --out. Runs on any number of processes "
                                   "(torchrun --nproc_per_node N -m mmer_dist.evaluate ...) with identical metrics.")
    p.add_argument("--model", required=True, help="run folder (uses its best checkpoint) or exported model folder")
    p.add_argument("--shards", required=True, help="shards folder")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", required=True, help="folder for metrics.json, predictions.jsonl and the plots")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size per process (default: 32)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="emotion of one raw utterance (any subset of video, audio, text)",
                       description="Predict the emotion of one raw utterance, decoded exactly as in training "
                                   "with the decode settings stored in the exported model.")
    p.add_argument("--model", required=True, help="run folder or exported model folder")
    p.add_argument("--video", default=None, help="video clip (mp4); its audio track is used when --audio is not given")
    p.add_argument("--audio", default=None, help="audio file (wav, flac, mp3, or a video's audio track)")
    p.add_argument("--text", default=None, help="transcript")
    p.add_argument("--context", action="append", default=None, metavar="'SPEAKER: WORDS'",
                   help="an earlier turn of the dialogue (repeat, oldest first); used by models trained with "
                        "data.text_context > 0, which read the last N of them after the transcript")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_predict)

    p = sub.add_parser("compare", help="side-by-side metrics of runs, per class (table and plot)",
                       description="Compare the metrics.json of several runs or evaluations: a table of the "
                                   "headline metrics and per-class F1, optionally compare.png and compare.json.")
    p.add_argument("runs", nargs="+", help="run folders, eval folders or metrics.json files")
    p.add_argument("--out", default="", help="folder for compare.png and compare.json (default: none)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("embed", help="precompute frozen-encoder embeddings into embedding shards",
                       description="Run the frozen encoders of a config once over media shards and write embedding "
                                   "shards (same keys and splits) to train kind=cached models on. Resumable: run the "
                                   "same command again; with torchrun -m mmer_dist.embed each rank embeds its shards.")
    p.add_argument("--config", required=True, help="preset name or YAML naming the encoders")
    p.add_argument("--shards", required=True, help="media shards folder")
    p.add_argument("--out", required=True, help="embedding shards folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.text.pooling=mean")
    p.set_defaults(func=_embed)

    p = sub.add_parser("demo", help="synthetic corpus -> pack -> train baseline and weighted (2 CPU processes) -> report",
                       description="The main job on the built-in default: a synthetic MELD-layout corpus, packed, "
                                   "two small models trained with 2 CPU processes (baseline and weighted sampler), "
                                   "both evaluated on the held-out split, with a report and plots.")
    p.add_argument("--out", default="mmer_demo", help="output folder (default: ./mmer_demo)")
    p.add_argument("--n", type=int, default=None, help="corpus size (default: the demo's size)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default: 2)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        # `train` owns its whole command line (preset, overrides, --help): hand it over untouched.
        return _train(argparse.Namespace(rest=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
