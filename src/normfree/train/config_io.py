"""Reading, merging and overriding :class:`~normfree.train.config.Config`.

Resolution order (later wins): the dataclass defaults → a shipped recipe (``--recipe``;
``digits`` unless a config file is given) → a YAML file (``--config``) → command-line overrides
``section.key=value``. Override values are parsed as YAML (``optim.lr=0.2``, ``data.flip=true``,
``data.randaugment=[2,9]``, ``optim.lr=null``) except for string fields, which take the text as
typed. Layers are merged as plain nested mappings and the result is validated once by pydantic
(a ``TypeAdapter`` over the config dataclasses: lax scalar conversion such as ``"1e-4"`` → float
and lists → tuples, unknown keys forbidden). Pydantic's errors are turned into one
:class:`~normfree.train.config.ConfigError` that names the dotted key, the expected type and, for
unknown keys, the closest valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import TypeAdapter, ValidationError

from normfree.atomic import atomic_write_text
from normfree.console import yaml_problem
from normfree.train.config import Config, ConfigError, chosen_kernels, validate_config

__all__ = [
    "apply_overrides",
    "checked_config",
    "config_diff",
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
@cache
def _adapter() -> TypeAdapter[Config]:
    return TypeAdapter(Config)


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


def _leaves(tp: Any) -> tuple[Any, ...]:
    """The members of a union (``int | None`` → ``(int, NoneType)``), else ``(tp,)``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _wants_raw_string(tp: Any) -> bool:
    """True when a command-line value should be kept as typed (str fields, str Literals)."""
    for arg in _leaves(tp):
        if arg is type(None) or arg is str:
            continue
        if typing.get_origin(arg) is Literal and all(isinstance(a, str) for a in arg.__args__):
            continue
        return False
    return True


def _unknown(key: str, options: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], options, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (see `normfree train --help`)")


def _locate(loc: tuple[Any, ...]) -> tuple[str, Any, list[str]]:
    """Follow a pydantic error location through the config dataclasses: the dotted key of the
    field it points into, that field's annotation (None when unknown) and its siblings' names."""
    cls: Any = Config
    parts: list[str] = []
    for item in loc:
        names = [f.name for f in dataclasses.fields(cls)]
        parts.append(str(item))
        if item not in names:
            return ".".join(parts), None, names
        tp = _hints(cls)[item]
        if not _is_section(tp):
            return ".".join(parts), tp, names
        cls = tp
    return ".".join(parts) or "<root>", cls, []


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _validation_error(err: ValidationError, data: dict[str, Any]) -> ConfigError:
    first = err.errors()[0]
    key, tp, names = _locate(tuple(first["loc"]))
    if first["type"] in ("unexpected_keyword_argument", "extra_forbidden") or tp is None:
        return _unknown(key, names)
    if _is_section(tp):
        return ConfigError(f"config section {key!r} must be a mapping, got {first['input']!r}")
    return ConfigError(
        f"config key {key!r}: expected {_type_name(tp)}, got {_lookup(data, key)!r} "
        f"({first['msg'][0].lower()}{first['msg'][1:]})"
    )


def _no_bool_numbers(data: dict[str, Any], cls: Any = Config, prefix: str = "") -> None:
    """pydantic's lax mode reads ``true`` as 1 for numbers; a config never means that."""
    hints = _hints(cls)
    for key, value in data.items():
        tp = hints.get(key)
        if tp is None:
            continue
        if _is_section(tp) and isinstance(value, dict):
            _no_bool_numbers(value, tp, f"{prefix}{key}.")
        elif isinstance(value, bool) and bool not in _leaves(tp) and Any not in _leaves(tp):
            raise ConfigError(
                f"config key {prefix + key!r}: expected {_type_name(tp)}, got {value}"
            )


def _validate(data: dict[str, Any]) -> Config:
    """The :class:`Config` of a complete nested mapping (pydantic; errors → ConfigError)."""
    _no_bool_numbers(data)
    try:
        return _adapter().validate_python(data)
    except ValidationError as e:
        raise _validation_error(e, data) from None


# --------------------------------------------------------------------------- dict <-> config
# sections older versions wrote (``debug``: test fault injection, now done with callbacks)
_RETIRED_SECTIONS = ("debug",)


def _merge(base: dict[str, Any], data: Any, cls: Any, prefix: str) -> None:
    """Lay ``data`` over ``base`` (both plain mappings of the dataclass ``cls``): sections are
    merged key by key (a string is a section's shorthand, e.g. ``data: digits``; an empty
    section, YAML's null, sets nothing), every other value replaces the one below. Validation
    happens afterwards, on the whole tree."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "<root>"
        raise ConfigError(f"config section {where!r} must be a mapping, got {data!r}")
    hints = _hints(cls)
    for key, value in data.items():
        tp = hints.get(key)
        if _is_section(tp):
            if value is None:  # "distill:" with every key below commented out: nothing set
                continue
            shorthand = getattr(tp, "SHORTHAND", None)
            if isinstance(value, str) and shorthand:
                value = {shorthand: value}
            _merge(base[key], value, tp, f"{prefix}{key}.")
        else:
            base[key] = value


def config_from_dict(data: dict[str, Any] | None, base: Config | None = None) -> Config:
    """A :class:`Config` from a nested mapping (as in a YAML file) laid over ``base``
    (the defaults when None). Unknown or ill-typed keys raise :class:`ConfigError`."""
    tree = config_to_dict(base if base is not None else Config())
    if isinstance(data, dict):  # files and checkpoints written before a key was retired
        data = {k: v for k, v in data.items() if k not in _RETIRED_SECTIONS}
    _merge(tree, data or {}, Config, "")
    return _validate(tree)


def checked_config(cfg: Config) -> Config:
    """``cfg`` checked as a config file is (types by pydantic, then ranges): a Config built or
    changed in code gets the same one-line :class:`ConfigError` naming the key. Returns the
    validated copy."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a normfree.train.Config, got {type(cfg).__name__}")
    checked = _validate(config_to_dict(cfg))
    validate_config(checked)
    return checked


def copy_config(cfg: Config) -> Config:
    """A deep copy of ``cfg``."""
    return _validate(config_to_dict(cfg))


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
    if p.is_dir():
        raise ConfigError(
            f"config file {str(p)!r} is a folder; --config takes a YAML file (a run folder's is "
            "RUN/config.yaml; --resume RUN continues that run)"
        )
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = _load_yaml(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(
            f"config file {str(p)!r} is not a UTF-8 text file; --config takes a YAML file "
            "(a checkpoint goes to --resume RUN_DIR or init_from=FILE)"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return data


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: ``safe_load`` keeps the
    last one silently, so a second ``optim:`` section drops the first's settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # (merge keys ``<<`` first, as the base class does)
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                continue  # (an unhashable key: the base class reports it)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (first at line {first[key]})",
                    key_node.start_mark,
                )  # fmt: skip
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with every key of a mapping given once (:class:`_StrictLoader`)."""
    return yaml.load(text, Loader=_StrictLoader)  # (a SafeLoader subclass: no arbitrary tags)


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``normfree/recipes``."""
    root = importlib.resources.files("normfree") / "recipes"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """The mapping of a shipped recipe (``digits``, ``cifar``, ``nfnet_imagenet``)."""
    names = list_recipes()
    if name not in names:
        raise ConfigError(
            f"unknown recipe {name!r}; shipped recipes: {', '.join(names)} (or none: the "
            "defaults alone)"
        )
    text = (importlib.resources.files("normfree") / "recipes" / f"{name}.yaml").read_text()
    return _load_yaml(text) or {}


# --------------------------------------------------------------------------- overrides
def _override_value(item: str, key: str, raw: str, tp: Any) -> Any:
    """The value of one ``key=raw`` override: the text itself for string fields, else YAML
    (``a,b`` is also accepted for tuples)."""
    if (
        tp is not None
        and _wants_raw_string(tp)
        and raw.strip().lower() not in ("null", "none", "~")
    ):
        return raw
    if not raw.strip():
        return None
    if tp is not None and any(typing.get_origin(a) is tuple for a in _leaves(tp)):
        if "," in raw and not raw.strip().startswith(("[", "(")):
            raw = f"[{raw}]"
    try:
        return _load_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {item!r}: the value of {key!r} is not valid YAML ({yaml_problem(e)}); "
            "quote strings and close brackets, e.g. model_kwargs.width=2 or data.randaugment=[2,9]"
        ) from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a copy of ``cfg``."""
    tree = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=0.2)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        node: dict[str, Any] = tree
        cls: Any = Config
        parts = key.split(".")
        for i, part in enumerate(parts):
            full = ".".join(parts[: i + 1])
            last = i == len(parts) - 1
            if cls is None:  # inside a free-form mapping (model_kwargs.width=2)
                if last:
                    node[part] = _override_value(item, full, raw, None)
                else:
                    child = node.get(part)
                    node = node.setdefault(part, {}) if not isinstance(child, dict) else child
                continue
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise _unknown(full, names)
            tp = _hints(cls)[part]
            if _is_section(tp):
                if last:
                    shorthand = getattr(tp, "SHORTHAND", None)
                    if not shorthand:
                        raise ConfigError(f"config key {full!r} is a section; set {full}.<key>=...")
                    node[part][shorthand] = raw
                else:
                    node, cls = node[part], tp
                continue
            if last:
                node[part] = _override_value(item, full, raw, tp)
            elif typing.get_origin(tp) is dict:
                node, cls = node[part], None
            else:
                raise _unknown(key, names)
    return _validate(tree)


def config_diff(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every leaf that differs (plain values;
    two spellings of one ``train.native_kernels`` choice do not differ)."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict) and not prefix.startswith("model_kwargs"):
            for k in list(a) + [k for k in b if k not in a]:
                walk(a.get(k), b.get(k), f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
        elif a != b:
            out[prefix] = (a, b)

    walk(config_to_dict(old), config_to_dict(new), "")
    key = "train.native_kernels"  # spellings of one choice ("scaled_ws", [scaled_ws]) are equal
    if key in out and chosen_kernels(out[key][0]) == chosen_kernels(out[key][1]):
        del out[key]
    return out


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
