"""Holder of the timm entrypoints that :func:`normfree.integrations.timm.register_timm_models`
creates (timm's registry records each entrypoint's module and lists its name in that module's
``__all__``; keeping them here leaves the bridge module itself unchanged).

``timm.list_models(module="timm_models")`` lists the registered normfree models.
"""

from typing import Any

__all__: list[str] = []

#: ``{timm name: pretrained_cfg}`` of the registered models: timm's ``register_model`` reads the
#: configurations of an entrypoint's module here.
default_cfgs: dict[str, dict[str, Any]] = {}
