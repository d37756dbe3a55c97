"""Building a `Config`: the defaults, then a YAML preset, then dotted overrides; dumping it and reading it back.

    cfg = load_config("debug", ["optim.lr=1e-3", "data.modalities=[text,audio]"])
    print(dump_config(cfg))                    # what `mmer-dist train --dump-config` prints
    save_config(cfg, run_dir / "config.yaml"); cfg == config_from_file(run_dir / "config.yaml")

Presets live in `mmer_dist/configs/NAME.yaml` (or any YAML path) and hold only differences from the
defaults (`base: NAME` names another preset to start from). Values are coerced to each field's type
with errors that name the key; an unknown key is an error with the closest valid one suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mmer_dist.config import Config, ConfigError, _check
from mmer_dist.jsonio import read_yaml

CONFIG_DIR = Path(__file__).parent / "configs"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML/override value into the annotated type, or raise a ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of fields, got {value!r}")
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}; choose one of {args}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a (partial) mapping; unknown keys are errors with a suggestion."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (valid here: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as e:   # a nested section's check names its field, not where the section sits
        if where and where not in str(e):
            raise ConfigError(f"{where}: {e}") from None
        raise


def to_dict(obj: Any) -> Any:
    """A plain, YAML-safe dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_path(name_or_path: str) -> Path:
    """Resolve a preset name (`debug`) or a YAML path to a file, with a clear error."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a YAML file nor a preset; presets: {', '.join(known)}")


def _read_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = preset_path(name_or_path)
    _check(str(path) not in seen, f"preset {path} names itself as base (cycle: {' -> '.join(seen)})")
    data = read_yaml(path, fix="a preset is a YAML mapping of config sections holding only differences from the "
                               "defaults (see mmer_dist/configs/debug.yaml)")
    base = data.pop("base", None)
    data.setdefault("name", path.stem)
    if base:
        data = _merge(_read_preset(base, seen + (str(path),)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value {raw!r} is not valid YAML; quote it or fix the brackets "
                          f"(e.g. data.modalities=[text,audio])") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            _check(isinstance(node, dict), f"override {text!r}: {part!r} is not a config section")
        node[path[-1]] = value
    return data


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- preset YAML <- dotted overrides, validated."""
    data: dict[str, Any] = _read_preset(name_or_path) if name_or_path else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return build(Config, data)
    except TypeError as e:  # a dataclass rejected a value's shape
        raise ConfigError(str(e)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(dump_config(cfg), encoding="utf-8")


def config_from_file(path: Path, fix: str = "") -> Config:
    """Read a resolved config.yaml written by a run (all fields present); errors name the file and `fix`."""
    fix = fix or "it is the config of the run that wrote it: restore it, or train into a new --out"
    try:
        return build(Config, read_yaml(path, fix=fix))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}; {fix}") from None
