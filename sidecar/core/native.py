"""The optional compiled modules (sidecar/dataplane/_fastcheck.c, sidecar/core/_auditchain.c):
a wheel built without a compiler has none, and their callers then run the pure-Python path."""

from __future__ import annotations

import importlib
from typing import Any


def optional_module(name: str) -> tuple[Any, str]:
    """(the module, '') when ``name`` loads; (None, why not) when it was not built or cannot
    load here."""
    try:
        return importlib.import_module(name), ""
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
