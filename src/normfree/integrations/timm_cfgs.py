"""The ``pretrained_cfg`` of every normfree model, for timm's registry, without building them.

timm reads a model's configuration from its registry *before* it builds the model:
``timm.models.resolve_model_input_args`` (how timm's scripts turn their arguments into
``create_model`` keywords), ``get_pretrained_cfg`` and ``get_pretrained_cfg_value``. A name with
no registered configuration gets timm's generic one (224 px, crop 0.875, no first conv), which
would then override the model's own. Building all 117 models to learn their configurations takes
about a minute and a half, too long for :func:`normfree.integrations.timm.register_timm_models`,
so the configurations ship as data: ``timm_cfgs.json`` holds
:meth:`normfree.models.NormFreeModel.default_pretrained_cfg` of each registered model as built
with its defaults. ``python -m normfree.integrations.timm_cfgs`` writes it again after a model's
metadata changes; the tests compare it with freshly built models.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

from normfree.atomic import atomic_write_text
from normfree.models import create_model, list_models

__all__ = ["CFG_FILE", "built_cfgs", "shipped_cfgs"]

#: Where the configurations ship, beside this module.
CFG_FILE = Path(__file__).with_name("timm_cfgs.json")

#: Keys whose values are tuples in timm's ``PretrainedCfg`` (JSON stores lists).
_TUPLE_KEYS = ("input_size", "test_input_size", "min_input_size", "mean", "std", "pool_size",
               "test_pool_size")  # fmt: skip


def _as_tuples(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if k in _TUPLE_KEYS and isinstance(v, list) else v for k, v in cfg.items()}


def built_cfgs(names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{name: pretrained_cfg}`` of each named model (all registered ones by default), built
    with its default keywords: the slow, authoritative source of :func:`shipped_cfgs`."""
    return {
        name: create_model(name).default_pretrained_cfg()  # type: ignore[operator]
        for name in (list_models() if names is None else names)
    }


@functools.lru_cache(maxsize=1)
def _read() -> dict[str, dict[str, Any]]:
    data = json.loads(CFG_FILE.read_text(encoding="utf-8"))
    return {name: _as_tuples(cfg) for name, cfg in data.items()}


def shipped_cfgs() -> dict[str, dict[str, Any]]:
    """``{name: pretrained_cfg}`` as shipped in ``timm_cfgs.json`` (fresh dicts: callers may
    change them)."""
    return {name: dict(cfg) for name, cfg in _read().items()}


def main(argv: list[str] | None = None) -> int:
    """Write ``timm_cfgs.json`` from freshly built models (``python -m
    normfree.integrations.timm_cfgs``; about a minute and a half on a CPU)."""
    if argv:
        print("usage: python -m normfree.integrations.timm_cfgs  (no arguments)", file=sys.stderr)
        return 2
    cfgs = built_cfgs()
    lines = [f"{json.dumps(name)}: {json.dumps(cfg, sort_keys=True)}" for name, cfg in cfgs.items()]
    atomic_write_text(CFG_FILE, "{\n" + ",\n".join(lines) + "\n}\n")  # a line per model
    print(f"wrote {len(cfgs)} configurations to {CFG_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
