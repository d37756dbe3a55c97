"""The `mmer-dist` command line: a table of commands, each owned by the module that does the work.

    mmer-dist synth meld --out /tmp/raw --n 300
    mmer-dist pack meld --root /tmp/raw --out /tmp/shards --workers 2
    mmer-dist inspect /tmp/shards
    mmer-dist train --config debug --shards /tmp/shards --out runs/debug
    mmer-dist demo

`mmer-dist CMD ARGS` imports only CMD's module and calls its `main(ARGS)`; every such module has a
`build_parser()` and keeps heavy imports (torch, av, matplotlib) inside its functions, so `--help`
is instant everywhere.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("mmer_dist.corpora.synthetic", "write a small learnable synthetic corpus in the dataset's own raw layout"),
    "pack": ("mmer_dist.shards.pack", "pack a raw corpus into WebDataset shards with an index"),
    "inspect": ("mmer_dist.shards.inspect", "summarise a shards folder (splits, classes, modalities, skipped inputs)"),
    "reindex": ("mmer_dist.shards.reindex", "rebuild a shards folder's index from its stats (upgrades older folders)"),
    "train": ("mmer_dist.train.__main__", "train a model (same as `python -m mmer_dist.train`)"),
    "eval": ("mmer_dist.evaluate", "evaluate a run or exported model on a split of a shards folder"),
    "predict": ("mmer_dist.predict", "emotion of one raw utterance (any subset of video, audio, text)"),
    "compare": ("mmer_dist.experiments.compare", "runs side by side (split, n, per class); two: paired bootstrap of the difference"),
    "embed": ("mmer_dist.embed", "precompute frozen-encoder embeddings into embedding shards"),
    "demo": ("mmer_dist.demo", "synthetic corpus -> pack -> train baseline and weighted (2 CPU processes) -> report"),
    "sweep": ("mmer_dist.experiments.sweep", "a grid of seeds x folds x overrides as run folders (resumable; local or Slurm)"),
    "summarize": ("mmer_dist.experiments.summary", "mean, std and 95% CI over a sweep's runs, its ensemble, a plot"),
    "verify": ("mmer_dist.shards.verify", "check every shard's size and sha256 against its stats; name the damaged ones"),
}
"""command -> (module with build_parser() and main(argv), one-line help)."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mmer-dist COMMAND [ARGS ...]", "",
             "Multimodal emotion recognition on MELD and RAVDESS: pack, stream, train, evaluate.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`mmer-dist COMMAND --help` explains a command's flags. "
                  "Start with `mmer-dist demo` (synthetic corpus, 2-process training, report)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmer-dist: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
