"""The error types every layer raises, so that one boundary (the command line) can map them to
exit codes without knowing where they came from (DESIGN.md, principle 13).

- :class:`UserError`: the input is wrong and the user can fix it (a spec field, a flag, a file
  of the wrong kind). The message names the file or field and the fix. The CLI exits 2.
- :class:`EnvironmentFault`: the machine refused (disk full, read-only folder, permission
  denied). The message says what could not be written or read and that nothing written earlier
  was lost. The CLI exits 1.

This module imports only the standard library, so every layer (``spec`` included) may import it.
"""

from __future__ import annotations

import importlib


class DitkitError(Exception):
    """Base of ditkit's typed errors."""


class UserError(DitkitError, ValueError):
    """Bad input the user can fix; reported as one line, exit status 2."""


class EnvironmentFault(DitkitError, OSError):
    """The environment refused an operation (disk, permissions); one line, exit status 1."""

    reason: str  # set by ditkit.files.environment_fault: the OS's words


# --------------------------------------------------------------------------------- extras
#: the ``pip install 'ditkit[EXTRA]'`` extra (pyproject.toml) that brings each optional module
EXTRAS = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "onnxruntime_ep_openvino": "openvino",
    "natten": "natten",
    "diffusers": "vae",
    "matplotlib": "diagram",
    "tensorrt": "tensorrt",
    "torch_tensorrt": "tensorrt",
}
# natten compiles against the installed torch: pip must not build it in an isolated env
_PIP_FLAGS = {"natten": " --no-build-isolation"}


class MissingExtra(UserError):
    """An optional package is not installed; the message names the ``pip install`` line."""


def install_hint(module: str) -> str:
    """The ``pip install`` line that brings ``module`` (its extra, or ``ditkit[all]``)."""
    top = module.partition(".")[0]
    extra = EXTRAS.get(top, "all")
    return f"pip install{_PIP_FLAGS.get(top, '')} 'ditkit[{extra}]'"


def missing_text(module: str, what: str) -> str:
    """``<module> is not installed (<what> needs it): pip install 'ditkit[...]'``."""
    return f"{module.partition('.')[0]} is not installed ({what} needs it): {install_hint(module)}"


def require(module: str, what: str, error: type[Exception] = MissingExtra):
    """Import and return the optional ``module``, or raise ``error`` (default
    :class:`MissingExtra`) whose message names what needed it and the ``pip install`` line.
    One helper for every optional import (onnx, onnxruntime, natten, diffusers, matplotlib,
    tensorrt, openvino), so the advice is the same everywhere. An ``ImportError`` raised
    *inside* an installed package (a broken install) is not hidden."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.partition(".")[0]
        if err.name is not None and err.name.partition(".")[0] != top:
            raise
        raise error(missing_text(module, what)) from None
