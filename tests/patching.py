"""Patch a library function at every place ditkit uses it.

ditkit modules import what they need at their top (``from safetensors.torch import
save_file``), so patching ``safetensors.torch.save_file`` alone does not reach them: each
module holds its own reference. :func:`patch_everywhere` replaces the function in its home
module and in every ditkit module that bound the same object.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType

import ditkit


def _import_all() -> None:
    for info in pkgutil.walk_packages(ditkit.__path__, "ditkit."):
        if info.name in sys.modules or info.name.endswith("__main__"):  # __main__ runs the CLI
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # a module that wraps an optional extra not installed here
            pass


def patch_everywhere(monkeypatch, home: ModuleType, name: str, new) -> list[str]:
    """Replace ``home.name`` with ``new`` there and in every ditkit module holding the same
    object; return the modules patched (so a test can check the use site was reached)."""
    _import_all()
    real = getattr(home, name)
    monkeypatch.setattr(home, name, new)
    patched = []
    for modname, mod in list(sys.modules.items()):
        if (modname == "ditkit" or modname.startswith("ditkit.")) and mod is not None:
            if getattr(mod, name, None) is real:
                monkeypatch.setattr(mod, name, new)
                patched.append(modname)
    return patched
