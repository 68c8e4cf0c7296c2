"""``python -m ditkit.cli`` (and ``torchrun -m ditkit.cli``)."""

import sys

from ditkit.cli import main

sys.exit(main())
