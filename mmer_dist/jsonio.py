"""Reading the JSON and YAML files the project writes, with errors that name the file and the fix.

    from mmer_dist.jsonio import DamagedFileError, read_json, read_yaml
    record = read_json(out / "pack.json", fix="re-pack with `mmer-dist pack ... --overwrite`")
    cfg = read_yaml(run / "config.yaml", fix="restore it, or train into a new --out")

A missing file raises `FileNotFoundError`; a file that does not parse, is not UTF-8 or holds another
kind of value than expected (a list where an object belongs) raises `DamagedFileError`. Both messages
name the file, say what is wrong and end with `fix`: the command that regenerates the file. Every
command catches these (they are OSError/ValueError) and prints the message without a traceback,
exit code 2. A leaf module: it imports nothing of the project, so every layer may use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


class DamagedFileError(ValueError):
    """A file the project wrote exists but cannot be used (not valid JSON/YAML, or not the expected shape)."""


def damaged(path: str | Path, problem: str, fix: str) -> DamagedFileError:
    """The error for `path`: what is wrong with it and how to make it again."""
    return DamagedFileError(f"{path} {problem}; {fix}")


def _read(path: str | Path, fix: str, kind: type, what: str, parse: Callable[[str], Any],
          errors: tuple[type[Exception], ...]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {fix}")
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise damaged(path, f"is not UTF-8 text ({e.reason} at byte {e.start})", fix) from None
    except errors as e:
        detail = " ".join(str(e).split())       # YAML errors span several lines
        raise damaged(path, f"is not valid {what} ({detail[:200]})", fix) from None
    if kind is dict and value is None and what == "YAML":
        value = {}                              # an empty YAML file is an empty mapping
    if not isinstance(value, kind):
        expected = "an object / mapping" if kind is dict else kind.__name__
        raise damaged(path, f"holds {type(value).__name__} where {expected} was expected", fix)
    return value


def read_json(path: str | Path, fix: str, kind: type = dict) -> Any:
    """The JSON value in `path` (an object unless `kind` says otherwise), or an error naming the file and `fix`."""
    return _read(path, fix, kind, "JSON", json.loads, (ValueError,))


def read_yaml(path: str | Path, fix: str, kind: type = dict) -> Any:
    """The YAML value in `path` (a mapping unless `kind` says otherwise; empty file = {}), or an error
    naming the file and `fix`."""
    import yaml

    return _read(path, fix, kind, "YAML", yaml.safe_load, (yaml.YAMLError,))
