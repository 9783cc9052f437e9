"""Bridges to other libraries, each imported only on request (``normfree.integrations.timm``)."""

__all__: list[str] = []  # the bridges are submodules, imported by name
