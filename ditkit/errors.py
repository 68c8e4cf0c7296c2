"""The error types every layer raises, so that one boundary (the command line) can map them to
exit codes without knowing where they came from (DESIGN.md, principle 13).

- :class:`UserError`: the input is wrong and the user can fix it (a spec field, a flag, a file
  of the wrong kind). The message names the file or field and the fix. The CLI exits 2.
- :class:`EnvironmentFault`: the machine refused (disk full, read-only folder, permission
  denied). The message says what could not be written or read and that nothing written earlier
  was lost. The CLI exits 1.

This module imports nothing, so every layer (``spec`` included) may import it.
"""

from __future__ import annotations


class DitkitError(Exception):
    """Base of ditkit's typed errors."""


class UserError(DitkitError, ValueError):
    """Bad input the user can fix; reported as one line, exit status 2."""


class EnvironmentFault(DitkitError, OSError):
    """The environment refused an operation (disk, permissions); one line, exit status 1."""
