"""Neighborhood-attention backends: time and peak memory (same as ``ditkit bench attention``).

    python benchmarks/attention.py                       # CPU: gather, tiled, masked
    python benchmarks/attention.py --backends gather,tiled --grids 128,256 --json out.json

Arguments are those of ``ditkit bench attention -h``.
"""

import sys

from ditkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "attention", *sys.argv[1:]]))
