"""Built-in presets by name (the Python helpers); ``examples/`` holds the same specs as YAML."""

from __future__ import annotations

from functools import partial
from typing import Callable

from .families import (
    DIT_SIZES,
    dit,
    hdit_ffhq_1024,
    hdit_imagenet_128,
    hdit_imagenet_256,
    mdit_b,
    mdit_l,
    mdit_xl,
    mpdit_b,
    mpdit_xl,
    mpdit_xl_3level,
)
from .model import ModelSpec

PRESETS: dict[str, Callable[[], ModelSpec]] = {
    **{f"dit-{size}-{p}": partial(dit, size, p) for size in DIT_SIZES for p in (2, 4, 8)},
    "hdit-imagenet-128": hdit_imagenet_128,
    "hdit-ffhq-1024": hdit_ffhq_1024,
    "hdit-imagenet-256": hdit_imagenet_256,
    "mdit-b": mdit_b,
    "mdit-l": mdit_l,
    "mdit-xl": mdit_xl,
    "mpdit-b": mpdit_b,
    "mpdit-xl": mpdit_xl,
    "mpdit-xl-3level": mpdit_xl_3level,
}


def preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"no preset named {name!r}; known: {', '.join(PRESETS)}") from None
