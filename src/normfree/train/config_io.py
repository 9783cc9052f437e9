"""Reading, merging and overriding :class:`~normfree.train.config.Config`.

Resolution order (later wins): the dataclass defaults → a shipped recipe (``--recipe``;
``digits`` unless a config file is given) → a YAML file (``--config``) → command-line overrides
``section.key=value``. Override values are parsed as YAML (``optim.lr=0.2``, ``data.flip=true``,
``data.randaugment=[2,9]``, ``optim.lr=null``) except for string fields, which take the text as
typed; every value is checked against the field's annotation. Unknown or ill-typed keys raise
:class:`~normfree.train.config.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from normfree.atomic import atomic_write_text
from normfree.train.config import Config, ConfigError, validate_config

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "config_help",
    "config_to_dict",
    "copy_config",
    "dump_config",
    "list_recipes",
    "load_config_file",
    "load_recipe",
    "resolve_config",
]


# --------------------------------------------------------------------------- typing helpers
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (tuple, list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists → tuples,
    ints → floats). Raises :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is tuple:
        if isinstance(value, str):
            value = [yaml.safe_load(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key!r}")  # pragma: no cover


def _wants_raw_string(tp: Any) -> bool:
    """True when a command-line value should be kept as typed (str fields, str Literals)."""
    origin = typing.get_origin(tp)
    if tp is str:
        return True
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return all(_wants_raw_string(a) for a in typing.get_args(tp) if a is not type(None))
    return False


def _unknown(key: str, options: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], options, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (see `normfree train --help`)")


# --------------------------------------------------------------------------- dict <-> config
def _merge_into(obj: Any, data: dict[str, Any], prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown(full, names)
        tp = hints[key]
        if _is_section(tp):
            shorthand = getattr(tp, "SHORTHAND", None)
            if isinstance(value, str) and shorthand:
                value = {shorthand: value}
            _merge_into(getattr(obj, key), value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, tp, full))


def config_from_dict(data: dict[str, Any] | None, base: Config | None = None) -> Config:
    """A :class:`Config` from a nested mapping (as in a YAML file) laid over ``base``
    (a copy; the defaults when None). Unknown or ill-typed keys raise :class:`ConfigError`."""
    cfg = copy_config(base) if base is not None else Config()
    _merge_into(cfg, data or {}, "")
    return cfg


def copy_config(cfg: Config) -> Config:
    """A deep copy of ``cfg``."""
    fresh = Config()
    _merge_into(fresh, config_to_dict(cfg), "")
    return fresh


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) — YAML/JSON/``torch.save`` friendly."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """The config as YAML text; also written to ``path`` when given."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if path is not None:
        atomic_write_text(path, text)
    return text


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping (validated when applied)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return data


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``normfree/recipes``."""
    root = importlib.resources.files("normfree") / "recipes"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """The mapping of a shipped recipe (``digits``, ``cifar``, ``nfnet_imagenet``)."""
    names = list_recipes()
    if name not in names:
        raise ConfigError(f"unknown recipe {name!r}; shipped recipes: {', '.join(names)}")
    text = (importlib.resources.files("normfree") / "recipes" / f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


# --------------------------------------------------------------------------- overrides
def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a copy of ``cfg``."""
    cfg = copy_config(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.2)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        obj: Any = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            full = ".".join(parts[: i + 1])
            if isinstance(obj, dict):  # model_kwargs.width=2
                if i == len(parts) - 1:
                    obj[part] = yaml.safe_load(raw)
                else:
                    obj = obj.setdefault(part, {})
                continue
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                raise _unknown(full, names)
            tp = _hints(type(obj))[part]
            last = i == len(parts) - 1
            if _is_section(tp):
                if last:
                    shorthand = getattr(tp, "SHORTHAND", None)
                    if not shorthand:
                        raise ConfigError(f"config key {full!r} is a section; set {full}.<key>=...")
                    setattr(getattr(obj, part), shorthand, raw)
                else:
                    obj = getattr(obj, part)
                continue
            if not last:
                if typing.get_origin(tp) is dict:
                    obj = getattr(obj, part)
                    continue
                raise _unknown(key, names)
            if _wants_raw_string(tp) and raw.strip().lower() not in ("null", "none", "~"):
                value: Any = raw
            else:
                try:
                    value = yaml.safe_load(raw) if raw.strip() else None
                except yaml.YAMLError:
                    value = raw
            setattr(obj, part, _coerce(value, tp, full))
    return cfg


def resolve_config(
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Defaults → recipe (``"digits"`` when neither a recipe nor a file is given; ``"none"``
    for none) → YAML file → overrides, then :func:`validate_config`."""
    if recipe is None and config_file is None:
        recipe = "digits"
    cfg = Config()
    if recipe and recipe != "none":
        cfg = config_from_dict(load_recipe(recipe), cfg)
    if config_file is not None:
        cfg = config_from_dict(load_config_file(config_file), cfg)
    cfg = apply_overrides(cfg, list(overrides or []))
    validate_config(cfg)
    return cfg


# --------------------------------------------------------------------------- help text
def config_help(recipe: str | None = "digits") -> str:
    """Every config key with its type, default and description (for ``--help``); keys that the
    ``recipe`` changes also show the recipe's value."""
    lines: list[str] = []
    with_recipe = config_to_dict(config_from_dict(load_recipe(recipe))) if recipe else {}

    def show(value: Any) -> str:
        text = yaml.safe_dump({"v": config_to_dict({"v": value})["v"]}, default_flow_style=True)
        return text.strip()[4:-1].strip()  # "{v: ...}" -> "..."

    def walk(cls: type, obj: Any, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if _is_section(tp):
                doc = (tp.__doc__ or "").strip().splitlines()[0].replace("``", "")
                lines.append("")
                lines.append(f"{prefix}{f.name}.*  ({doc})")
                walk(tp, getattr(obj, f.name), f"{prefix}{f.name}.")
                continue
            default = getattr(obj, f.name)
            text = f"  {prefix}{f.name} ({_type_name(tp)}; default {show(default)})"
            if with_recipe:
                node: Any = with_recipe
                for part in f"{prefix}{f.name}".split("."):
                    node = node[part]
                if node != config_to_dict({"v": default})["v"]:
                    text += f" [{recipe}: {show(node)}]"
            lines.append(f"{text}: {f.metadata['help']}")

    walk(Config, Config(), "")
    return "\n".join(lines)
