"""MONAI bundles of ul3d's networks: config templates (:mod:`.templates`), the run-time components the bundle
configs call (:mod:`.components`), metadata validation (:mod:`.metadata`), export and checks (:mod:`.export`).

Imported lazily: a running bundle imports only :mod:`.components`.
"""

from __future__ import annotations

import importlib

__all__ = ["BundleError", "check_bundle", "export_bundle", "export_models", "write_bundle"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".export", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
