"""Bridges to other libraries, each imported only on request (``normfree.integrations.timm``)."""
