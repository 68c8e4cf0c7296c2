"""Training data: datasets that yield ``(image (C, H, W) in [-1, 1], label)`` and a
deterministic, resumable, per-rank sampler.

Every dataset is built for the model's resolution and channel count; problems (a missing
folder, an unreadable image, no images) raise :class:`DataError` naming the path and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ditkit.spec import experiment as E

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """Bad training data (path, file, format): reported without a traceback."""


class ImageDataset(torch.utils.data.Dataset):
    """Base: ``num_classes`` (``None``: unconditional) and ``__getitem__ -> (image, label)``."""

    num_classes: int | None = None


class TensorImages(ImageDataset):
    """Images held in memory as one ``(N, C, H, W)`` float tensor in [-1, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None):
        self.images, self.labels, self.num_classes = images, labels, num_classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: ``(N, 8, 8)`` floats in [0, 1] and labels (no download)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of ``(N, C, h, w)``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def digits_tensor(resolution: tuple[int, int], channels: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as ``(N, channels, H, W)`` in [-1, 1] and labels."""
    images, labels = digits_arrays()
    x = resize_images(torch.from_numpy(images)[:, None], resolution).clamp(0, 1) * 2 - 1
    if channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(labels)


# -------------------------------------------------------------------------------- shapes

SHAPES = ("disc", "square", "triangle", "ring", "cross", "bars_h", "bars_v", "diamond",
          "checker", "ellipse")


def shape_image(index: int, label: int, resolution: tuple[int, int], seed: int = 0
                ) -> np.ndarray:
    """One procedural image ``(3, H, W)`` in [-1, 1]: the shape of class ``label`` at a random
    (seeded by ``seed`` and ``index``) position, size and colour on a dark background."""
    h, w = resolution
    rng = np.random.default_rng([seed, index])
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1,
                         indexing="ij")
    r = rng.uniform(0.35, 0.7)
    cy, cx = rng.uniform(-1 + r, 1 - r, size=2) * 0.8
    y, x = (yy - cy) / r, (xx - cx) / r
    name = SHAPES[label]
    if name == "disc":
        m = x**2 + y**2 <= 1
    elif name == "square":
        m = (abs(x) <= 0.8) & (abs(y) <= 0.8)
    elif name == "triangle":
        m = (y <= 0.8) & (y >= 2 * abs(x) - 1)
    elif name == "ring":
        d = x**2 + y**2
        m = (d <= 1) & (d >= 0.45)
    elif name == "cross":
        m = ((abs(x) <= 0.25) & (abs(y) <= 1)) | ((abs(y) <= 0.25) & (abs(x) <= 1))
    elif name == "bars_h":
        m = (abs(x) <= 1) & (abs(y) <= 1) & (np.floor((y + 1) * 2.5) % 2 == 0)
    elif name == "bars_v":
        m = (abs(x) <= 1) & (abs(y) <= 1) & (np.floor((x + 1) * 2.5) % 2 == 0)
    elif name == "diamond":
        m = abs(x) + abs(y) <= 1
    elif name == "checker":
        m = (abs(x) <= 1) & (abs(y) <= 1) & ((np.floor((x + 1) * 2) + np.floor((y + 1) * 2))
                                             % 2 == 0)
    else:  # ellipse
        m = (x / 1.0) ** 2 + (y / 0.5) ** 2 <= 1
    colour = rng.uniform(0.3, 1.0, size=3)
    background = rng.uniform(0.0, 0.15, size=3)
    img = np.where(m[None], colour[:, None, None], background[:, None, None])
    return (img * 2 - 1).astype(np.float32)


class ShapesDataset(ImageDataset):
    """``count`` procedural images, generated on demand (label ``i % classes``)."""

    def __init__(self, spec: E.ShapesData, resolution: tuple[int, int], channels: int = 3):
        self.spec, self.resolution, self.channels = spec, tuple(resolution), channels
        self.num_classes = spec.classes

    def __len__(self) -> int:
        return self.spec.count

    def __getitem__(self, i: int):
        label = i % self.spec.classes
        img = torch.from_numpy(shape_image(i, label, self.resolution, self.spec.seed))
        return img, torch.tensor(label)


# -------------------------------------------------------------------------------- image folder


class ImageFolder(ImageDataset):
    """Images under ``path`` (one sub-folder per class, or flat: unconditional)."""

    def __init__(self, spec: E.ImageFolderData, resolution: tuple[int, int], channels: int,
                 base: Path | None = None):
        root = Path(spec.path)
        if not root.is_absolute() and base is not None:
            root = base / root
        if not root.is_dir():
            raise DataError(f"data.path: no such folder: {root} (relative paths start at the "
                            "experiment file's folder)")
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        files: list[tuple[Path, int]] = []
        if subdirs:
            for label, d in enumerate(subdirs):
                files += [(f, label) for f in sorted(d.rglob("*"))
                          if f.suffix.lower() in IMAGE_SUFFIXES]
            self.classes = [d.name for d in subdirs]
            self.num_classes = len(subdirs)
        else:
            files = [(f, 0) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
            self.classes, self.num_classes = [], None
        if not files:
            raise DataError(f"data.path: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        if channels not in (1, 3):
            raise DataError(f"image_folder data gives 1 (L) or 3 (RGB) channels; the model's "
                            f"input.channels is {channels}")
        self.files, self.resolution, self.channels = files, tuple(resolution), channels
        self.flip = spec.flip
        self.flip_seed = 0  # set by the trainer per epoch for reproducible flips

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image

        path, _ = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                h, w = self.resolution
                scale = max(h / im.height, w / im.width)
                size = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
                im = im.resize(size, Image.BICUBIC)
                left, top = (size[0] - w) // 2, (size[1] - h) // 2
                im = im.crop((left, top, left + w, top + h))
                arr = np.asarray(im, dtype=np.float32) / 127.5 - 1
        except (OSError, ValueError) as err:
            raise DataError(f"data.path: cannot read image {path}: {err}; remove or replace "
                            "the file") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def __getitem__(self, i: int):
        img = self.load(i)
        if self.flip and np.random.default_rng([self.flip_seed, i]).random() < 0.5:
            img = img.flip(-1)
        return img, torch.tensor(self.files[i][1])


def make_dataset(exp: E.Experiment, base: Path | None = None) -> ImageDataset:
    spec = exp.model_spec
    res, ch = tuple(spec.input.resolution), spec.input.channels
    match exp.data:
        case E.DigitsData():
            images, labels = digits_tensor(res, ch)
            return TensorImages(images, labels, 10)
        case E.ShapesData() as d:
            return ShapesDataset(d, res, ch)
        case E.ImageFolderData() as d:
            return ImageFolder(d, res, ch, base)
    raise DataError(f"data.kind {exp.data.kind!r} is not supported")


# -------------------------------------------------------------------------------- sampling


@dataclass
class Position:
    """Where the data stream is: epoch and the number of global samples already drawn in it."""

    epoch: int = 0
    offset: int = 0


class BatchStream:
    """Deterministic batches: epoch ``e`` visits ``randperm(N, seed + e)``; a global batch is
    the next ``batch_size`` indices (wrapping into the next epoch), split across ranks by
    stride (rank ``r`` takes positions ``r, r + world, ...``). The position is saved in
    checkpoints, so a resumed run draws exactly the batches the original would have."""

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, position: Position | None = None):
        if batch_size % world:
            raise ValueError(f"training.batch_size {batch_size} is not divisible by the "
                             f"{world} processes")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world
        self.position = position or Position()
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=g))
        return self._perm[1]

    def next_indices(self, n: int) -> list[int]:
        """The next ``n`` global indices (all ranks); advances the position."""
        out: list[int] = []
        while len(out) < n:
            perm = self._permutation(self.position.epoch)
            take = min(n - len(out), len(perm) - self.position.offset)
            out += perm[self.position.offset:self.position.offset + take].tolist()
            self.position.offset += take
            if self.position.offset == len(perm):
                self.position = Position(self.position.epoch + 1, 0)
        return out

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next ``n`` global samples: ``(images, labels)``."""
        idx = self.next_indices(n)[self.rank::self.world]
        if isinstance(self.dataset, ImageFolder):
            self.dataset.flip_seed = self.seed * 1_000_003 + self.position.epoch
        if isinstance(self.dataset, TensorImages):
            t = torch.as_tensor(idx)
            return self.dataset.images[t], self.dataset.labels[t]
        items = [self.dataset[i] for i in idx]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

