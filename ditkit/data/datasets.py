"""Training data: datasets that yield ``(image (C, H, W) in [-1, 1], label)`` and a
deterministic, resumable, per-rank sampler.

Every dataset is built for the model's resolution and channel count; problems (a missing
folder, an unreadable image, no images) raise :class:`DataError` naming the path and the fix.
"""

from __future__ import annotations

import contextlib
import glob
import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from tqdm import tqdm

from ditkit.errors import UserError
from ditkit.files import atomic_path
from ditkit.spec import experiment as E
from ditkit.spec.limits import OVERRIDE_HINT, limits_enabled

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(UserError):
    """Bad training data (path, file, format): reported without a traceback."""


class ImageDataset(torch.utils.data.Dataset):
    """Base: ``num_classes`` (``None``: unconditional) and ``__getitem__ -> (image, label)``.
    A dataset that can give its images at another resolution (multi-resolution training,
    ``training.resolutions``) overrides :meth:`set_resolution`."""

    num_classes: int | None = None

    def set_resolution(self, resolution: tuple[int, int]) -> None:
        """Give the following images at ``resolution`` ``(H, W)``."""
        raise DataError(
            f"training.resolutions: {type(self).__name__} data holds its samples at one "
            "resolution and cannot render or resize them per batch; remove "
            "training.resolutions or train on images (digits, shapes, image_folder, webdataset)"
        )

    if TYPE_CHECKING:  # every dataset has a length (torch's Dataset does not declare one)

        def __len__(self) -> int: ...


class TensorImages(ImageDataset):
    """Images held in memory as one ``(N, C, H, W)`` float tensor in [-1, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None):
        self.images, self.labels, self.num_classes = images, labels, num_classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


class DigitsImages(TensorImages):
    """scikit-learn's digits held in memory at the resolution asked for (every resolution is
    resized from the 8x8 originals once and kept)."""

    def __init__(self, resolution: tuple[int, int], channels: int):
        self.channels = channels
        images, labels = digits_tensor(resolution, channels)
        super().__init__(images, labels, 10)
        self._at: dict[tuple[int, int], torch.Tensor] = {tuple(resolution): images}  # type: ignore[dict-item]

    def set_resolution(self, resolution: tuple[int, int]) -> None:
        res = (int(resolution[0]), int(resolution[1]))
        if res not in self._at:
            self._at[res] = digits_tensor(res, self.channels)[0]
        self.images = self._at[res]


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


def digits_tensor(
    resolution: tuple[int, int], channels: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as ``(N, channels, H, W)`` in [-1, 1] and labels."""
    images, labels = digits_arrays()
    x = resize_images(torch.from_numpy(images)[:, None], resolution).clamp(0, 1) * 2 - 1
    if channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(labels)


# -------------------------------------------------------------------------------- shapes

SHAPES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "bars_h",
    "bars_v",
    "diamond",
    "checker",
    "ellipse",
)


def shape_image(index: int, label: int, resolution: tuple[int, int], seed: int = 0) -> np.ndarray:
    """One procedural image ``(3, H, W)`` in [-1, 1]: the shape of class ``label`` at a random
    (seeded by ``seed`` and ``index``) position, size and colour on a dark background."""
    h, w = resolution
    rng = np.random.default_rng([seed, index])
    yy, xx = np.meshgrid(
        (np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1, indexing="ij"
    )
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
        m = (
            (abs(x) <= 1)
            & (abs(y) <= 1)
            & ((np.floor((x + 1) * 2) + np.floor((y + 1) * 2)) % 2 == 0)
        )
    else:  # ellipse
        m = (x / 1.0) ** 2 + (y / 0.5) ** 2 <= 1
    colour = rng.uniform(0.3, 1.0, size=3)
    background = rng.uniform(0.0, 0.15, size=3)
    img = np.where(m[None], colour[:, None, None], background[:, None, None])
    return (img * 2 - 1).astype(np.float32)


class ShapesDataset(ImageDataset):
    """``count`` procedural images, generated on demand (label ``i % classes``)."""

    def __init__(self, spec: E.ShapesData, resolution: tuple[int, int], channels: int = 3):
        self.spec, self.channels = spec, channels
        self.resolution = cast(tuple[int, int], tuple(resolution))
        self.num_classes = spec.classes

    def __len__(self) -> int:
        return self.spec.count

    def set_resolution(self, resolution: tuple[int, int]) -> None:
        """Render the following images at ``resolution`` (the same shapes, drawn anew)."""
        self.resolution = (int(resolution[0]), int(resolution[1]))

    def __getitem__(self, i: int):
        label = i % self.spec.classes
        img = torch.from_numpy(shape_image(i, label, self.resolution, self.spec.seed))
        return img, torch.tensor(label)


# -------------------------------------------------------------------------------- image folder


class ImageTooLarge(DataError):
    """An image whose header claims more pixels than PIL's decompression-bomb limit."""


@contextlib.contextmanager
def open_image(source):
    """``PIL.Image.open(source)`` with the decompression-bomb guard as a typed error: an image
    claiming more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (twice that: PIL only warns
    between) raises :class:`ImageTooLarge` (a ``ValueError``) with the size, before it is
    decoded. ``DITKIT_NO_SIZE_LIMITS=1`` (``--no-size-limits``) lifts it, as the spec limits."""

    before = Image.MAX_IMAGE_PIXELS
    if not limits_enabled():
        Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(source) as im:
            yield im
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(
            f"{str(err).split(', could be')[0]} (about "
            f"{Image.MAX_IMAGE_PIXELS * 4 / 2**30:.2g}+ GiB decoded); "
            f"{OVERRIDE_HINT}"
        ) from None
    finally:
        Image.MAX_IMAGE_PIXELS = before


def load_image(source, resolution: tuple[int, int], channels: int) -> torch.Tensor:
    """An image file (path or binary file object) -> ``(channels, H, W)`` in [-1, 1]: resized
    (bicubic) so it covers ``resolution``, then centre-cropped. Raises ``OSError`` /
    ``ValueError`` for unreadable data."""

    with open_image(source) as opened:
        im = opened.convert("RGB" if channels == 3 else "L")
        h, w = resolution
        scale = max(h / im.height, w / im.width)
        size = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - w) // 2, (size[1] - h) // 2
        im = im.crop((left, top, left + w, top + h))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


class ImageFolder(ImageDataset):
    """Images under ``path`` (one sub-folder per class, or flat: unconditional)."""

    def __init__(
        self,
        spec: E.ImageFolderData,
        resolution: tuple[int, int],
        channels: int,
        base: Path | None = None,
    ):
        root = Path(spec.path)
        if not root.is_absolute() and base is not None:
            root = base / root
        if not root.is_dir():
            raise DataError(
                f"data.path: no such folder: {root} (relative paths start at the "
                "experiment file's folder)"
            )
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        files: list[tuple[Path, int]] = []
        if subdirs:
            for label, d in enumerate(subdirs):
                files += [
                    (f, label) for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES
                ]
            self.classes = [d.name for d in subdirs]
            self.num_classes = len(subdirs)
        else:
            files = [(f, 0) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
            self.classes, self.num_classes = [], None
        if not files:
            raise DataError(f"data.path: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        if channels not in (1, 3):
            raise DataError(
                f"image_folder data gives 1 (L) or 3 (RGB) channels; the model's "
                f"input.channels is {channels}"
            )
        self.files, self.channels = files, channels
        self.resolution = cast(tuple[int, int], tuple(resolution))
        self.flip = spec.flip
        self.flip_seed = 0  # set by the trainer per epoch for reproducible flips

    def __len__(self) -> int:
        return len(self.files)

    def set_resolution(self, resolution: tuple[int, int]) -> None:
        """Load the following images at ``resolution`` (resized from the files)."""
        self.resolution = (int(resolution[0]), int(resolution[1]))

    def load(self, i: int) -> torch.Tensor:
        path, _ = self.files[i]
        try:
            return load_image(path, self.resolution, self.channels)
        except (OSError, ValueError) as err:
            raise DataError(
                f"data.path: cannot read image {path}: {err}; remove or replace the file"
            ) from None

    def __getitem__(self, i: int):
        img = self.load(i)
        if self.flip and np.random.default_rng([self.flip_seed, i]).random() < 0.5:
            img = img.flip(-1)
        return img, torch.tensor(self.files[i][1])


# -------------------------------------------------------------------------------- paths


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar``; ``{x,y}`` -> alternatives
    (the brace patterns webdataset users write). Zero-padded when the first bound is."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.groups()
        width = len(a) if a.startswith("0") else 0
        step = 1 if int(b) >= int(a) else -1
        parts = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    else:
        parts = body.split(",")
    return [x for part in parts for x in expand_braces(head + part + tail)]


def resolve_files(
    patterns: str | list[str], base: Path | None, field: str, what: str
) -> list[Path]:
    """Paths from a list / brace pattern / glob (relative to ``base``); every named file must
    exist and every glob must match. Raises :class:`DataError` naming ``field``."""

    out: list[Path] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        for item in expand_braces(pattern):
            path = Path(item)
            if not path.is_absolute() and base is not None:
                path = base / path
            if glob.has_magic(str(path)):
                found = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
                if not found:
                    raise DataError(
                        f"{field}: no {what} match {path} (relative paths start at "
                        "the experiment file's folder)"
                    )
                out += found
            elif not path.is_file():
                raise DataError(
                    f"{field}: no such {what.rstrip('s')}: {path} (relative paths "
                    "start at the experiment file's folder)"
                )
            else:
                out.append(path)
    return out


# -------------------------------------------------------------------------------- webdataset


@dataclass(frozen=True)
class ShardSample:
    """One sample of a tar shard: its key and where its members' bytes are in the file."""

    key: str
    image: tuple[str, int, int]
    """(member name, data offset, size)"""
    label: tuple[int, int] | None
    """(data offset, size) of ``KEY.cls``"""


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def index_shard(path: Path) -> list[ShardSample]:
    """The samples of one uncompressed tar shard, in file order (reads headers only)."""

    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                groups.setdefault(key, {})[ext] = m
    except (tarfile.TarError, OSError) as err:
        raise DataError(
            f"data.shards: {path} is not a readable tar file ({err}); shards must "
            "be uncompressed .tar files (see ditkit shards)"
        ) from None
    samples = []
    images = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)
    for key, members in groups.items():
        image_ext = next((e for e in members if e in images), None)
        if image_ext is None:
            raise DataError(
                f"data.shards: sample {key!r} in {path} has no image member "
                f"({', '.join('.' + e for e in images)}); members: "
                f"{', '.join(sorted(m.name for m in members.values()))}"
            )
        im = members[image_ext]
        cls = members.get("cls")
        samples.append(
            ShardSample(
                key,
                (im.name, im.offset_data, im.size),
                (cls.offset_data, cls.size) if cls is not None else None,
            )
        )
    if not samples:
        raise DataError(f"data.shards: {path} holds no samples (KEY.png/KEY.jpg + KEY.cls)")
    return samples


def _is_tar(path: Path) -> bool:

    try:
        with tarfile.open(path, "r:") as tar:
            tar.next()
        return True
    except (tarfile.TarError, OSError):
        return False


class WebDataset(ImageDataset):
    """Images (+ ``.cls`` labels) in webdataset tar shards, read with random access inside a
    shard. ``classes``: the model's class count (labels are required and checked against it),
    ``None`` for an unconditional model (labels are ignored)."""

    def __init__(
        self,
        spec: E.WebDatasetData,
        resolution: tuple[int, int],
        channels: int,
        base: Path | None = None,
        classes: int | None = None,
    ):
        if channels not in (1, 3):
            raise DataError(
                f"webdataset data gives 1 (L) or 3 (RGB) channels; the model's "
                f"input.channels is {channels}"
            )
        self.shards = resolve_files(spec.shards, base, "data.shards", "shards")
        for path in self.shards:  # cheap up-front check (the first header); full index lazily
            if not _is_tar(path):
                raise DataError(
                    f"data.shards: {path} is not a readable tar file; shards must "
                    "be uncompressed .tar files (see ditkit shards)"
                )
        self.channels, self.flip = channels, spec.flip
        self.resolution = cast(tuple[int, int], tuple(resolution))
        self.num_classes = classes
        self._index: dict[int, list[ShardSample]] = {}
        self._file: tuple[int, BinaryIO] | None = None

    def set_resolution(self, resolution: tuple[int, int]) -> None:
        """Load the following images at ``resolution`` (resized from the stored images)."""
        self.resolution = (int(resolution[0]), int(resolution[1]))

    def samples(self, shard: int) -> list[ShardSample]:
        if shard not in self._index:
            self._index[shard] = index_shard(self.shards[shard])
        return self._index[shard]

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._file is None or self._file[0] != shard:
            if self._file is not None:
                self._file[1].close()
            self._file = (shard, open(self.shards[shard], "rb"))
        f = self._file[1]
        f.seek(offset)
        return f.read(size)

    def read(self, shard: int, j: int, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``j`` of shard ``shard`` (in file order): ``(image, label)``."""

        path, s = self.shards[shard], self.samples(shard)[j]
        name, offset, size = s.image
        try:
            img = load_image(
                io.BytesIO(self._read(shard, offset, size)), self.resolution, self.channels
            )
        except (OSError, ValueError) as err:
            raise DataError(
                f"data.shards: cannot read image {name} in {path}: {err}; remove "
                "or replace that member"
            ) from None
        label = 0
        if self.num_classes is not None:
            found = self.label(shard, j)
            if found is None:
                raise DataError(
                    f"data.shards: sample {s.key!r} in {path} has no .cls label but "
                    "the model is class-conditional (model.conditioning.classes); "
                    "add KEY.cls members or remove conditioning.classes"
                )
            label = found
            if not 0 <= label < self.num_classes:
                raise DataError(
                    f"data.shards: {s.key}.cls in {path} is label {label}, outside "
                    f"[0, {self.num_classes}) of model.conditioning.classes.count"
                )
        if flip:
            img = img.flip(-1)
        return img, torch.tensor(label)

    def label(self, shard: int, j: int) -> int | None:
        """The ``.cls`` label of sample ``j`` of ``shard`` (``None`` when it has none)."""
        s = self.samples(shard)[j]
        if s.label is None:
            return None
        text = self._read(shard, *s.label)
        try:
            return int(text.decode().strip())
        except ValueError:
            raise DataError(
                f"data.shards: {s.key}.cls in {self.shards[shard]} is not an integer "
                f"label: {text[:40]!r}"
            ) from None

    def __len__(self) -> int:
        return sum(len(self.samples(i)) for i in range(len(self.shards)))

    def __iter__(self):
        """``(image, label or None)`` for every sample once, in shard and file order, without
        flips (``ditkit encode``)."""
        for i in range(len(self.shards)):
            for j in range(len(self.samples(i))):
                yield self.read(i, j)[0], self.label(i, j)


def write_shards(
    samples,
    out: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    progress: bool = False,
    check_images: bool = True,
) -> list[Path]:
    """Write ``samples`` -- ``(key, image, label)`` with ``image`` a PIL image, a path to an
    image file or encoded bytes, ``label`` an int or ``None`` -- as webdataset tar shards
    ``out/PREFIX-000000.tar`` ... of ``shard_size`` samples (PNG for PIL images; files are
    stored as they are). Each shard is written atomically. Returns the shard paths.

    ``check_images``: decode every file or bytes image first; a corrupt one is a
    :class:`DataError` naming it, and the shards written so far are removed (no half dataset;
    tests turn it off to make deliberately broken shards)."""

    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size}: must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    pending: list[tuple[str, bytes, str, int | None]] = []

    def flush():
        path = out / f"{prefix}-{len(paths):06d}.tar"
        with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, data, ext, label in pending:
                members = [(f"{key}.{ext}", data)]
                if label is not None:
                    members.append((f"{key}.cls", str(int(label)).encode()))
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
        pending.clear()

    try:
        for key, image, label in tqdm(samples, desc="shards", unit="img", disable=not progress):
            if "." in key.rpartition("/")[2]:
                raise ValueError(
                    f"sample key {key!r}: keys must not contain a dot in their "
                    "name (the first dot starts the extension)"
                )
            if isinstance(image, (str, Path)):
                data, ext = Path(image).read_bytes(), Path(image).suffix.lower().lstrip(".")
                if check_images:
                    _check_image(data, str(image))
            elif isinstance(image, bytes):
                data, ext = image, "png"
                if check_images:
                    _check_image(data, f"sample {key!r}")
            else:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
            pending.append((key, data, "jpg" if ext == "jpeg" else ext, label))
            if len(pending) == shard_size:
                flush()
        if pending:
            flush()
    except BaseException:  # no half dataset: the shards of this call go too
        for path in paths:
            path.unlink(missing_ok=True)
        raise
    return paths


def _check_image(data: bytes, name: str) -> None:
    """Decode ``data`` fully (a truncated or corrupt file fails here, not in training)."""
    try:
        with open_image(io.BytesIO(data)) as im:
            im.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(
            f"data.path: {name} is not a readable image ({err}); fix or remove "
            "it, nothing was written"
        ) from None


def image_folder_samples(root: str | Path):
    """``(key, path, label)`` for every image of an image folder (labels: sorted sub-folders,
    ``None`` for a flat folder) -- the input of :func:`write_shards`."""
    ds = ImageFolder(E.ImageFolderData(path=str(root), flip=False), (1, 1), 3)
    for i, (path, label) in enumerate(ds.files):
        yield f"{i:08d}", path, (label if ds.num_classes is not None else None)


# -------------------------------------------------------------------------------- latents

LATENT_SUFFIXES = (".safetensors", ".npz")


class LatentShards(ImageDataset):
    """Latents ``(N, C, h, w)`` (+ ``labels``) from ``.safetensors`` / ``.npz`` shards,
    multiplied by ``scale``. safetensors shards are memory-mapped and read row by row; npz
    shards are loaded into memory. Shapes and labels are checked against the model spec."""

    def __init__(self, spec: E.LatentsData, model, base: Path | None = None):
        root = Path(spec.path)
        if not root.is_absolute() and base is not None:
            root = base / root
        if root.is_dir():
            files = sorted(p for p in root.iterdir() if p.suffix in LATENT_SUFFIXES)
            if not files:
                raise DataError(
                    f"data.path: no latent shards ({', '.join(LATENT_SUFFIXES)}) "
                    f"in {root}; write them with ditkit encode"
                )
        else:
            files = resolve_files(str(root), None, "data.path", "latent shards")
        bad = [p for p in files if p.suffix not in LATENT_SUFFIXES]
        if bad:
            raise DataError(
                f"data.path: {bad[0]} is not a latent shard (use {' or '.join(LATENT_SUFFIXES)})"
            )
        cls = model.conditioning.classes
        self.num_classes = cls.count if cls is not None else None
        self.scale, self.files = spec.scale, files
        self._arrays: dict[int, torch.Tensor] = {}
        self._handles: dict[int, Any] = {}  # safetensors' safe_open handles
        self._labels: list[torch.Tensor | None] = []
        counts = []
        want_c, want_hw = model.input.channels, tuple(model.input.resolution)
        for k, path in enumerate(files):
            shape, labels = self._open(k, path)
            if len(shape) != 4:
                raise DataError(
                    f"data.path: `latents` in {path} has shape {list(shape)}; expected (N, C, h, w)"
                )
            n, c, h, w = shape
            if c != want_c:
                raise DataError(
                    f"model.input.channels is {want_c} but the latents in {path} "
                    f"have {c} channels; set input.channels: {c}"
                )
            if (h, w) != want_hw:
                raise DataError(
                    f"model.input.resolution is {list(want_hw)} but the latents in "
                    f"{path} are {h}x{w}; set input.resolution: [{h}, {w}] (or "
                    "encode images of the size the model needs)"
                )
            if labels is not None and labels.shape != (n,):
                raise DataError(
                    f"data.path: `labels` in {path} has shape {list(labels.shape)};"
                    f" expected ({n},) to match the latents"
                )
            if self.num_classes is not None:
                if labels is None:
                    raise DataError(
                        f"data.path: {path} has no `labels` but the model is "
                        "class-conditional (model.conditioning.classes); encode "
                        "labelled images or remove conditioning.classes"
                    )
                if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                    raise DataError(
                        f"data.path: labels in {path} span [{int(labels.min())}, "
                        f"{int(labels.max())}] but model.conditioning.classes.count"
                        f" is {self.num_classes}"
                    )
            self._labels.append(labels)
            counts.append(n)
        self.offsets = np.cumsum([0] + counts)
        if self.offsets[-1] == 0:
            raise DataError(f"data.path: the latent shards under {root} hold no samples")

    def _open(self, k: int, path: Path):
        """``(latents shape, labels or None)``; keeps the shard open (or loaded)."""
        try:
            if path.suffix == ".safetensors":
                f = safe_open(str(path), framework="pt")
                keys = set(f.keys())
                if "latents" not in keys:
                    raise DataError(
                        f"data.path: {path} has no `latents` tensor (keys: "
                        f"{', '.join(sorted(keys)) or 'none'})"
                    )
                self._handles[k] = f
                labels = f.get_tensor("labels").long() if "labels" in keys else None
                return tuple(f.get_slice("latents").get_shape()), labels
            with np.load(path) as z:
                if "latents" not in z.files:
                    raise DataError(
                        f"data.path: {path} has no `latents` array (arrays: "
                        f"{', '.join(z.files) or 'none'})"
                    )
                self._arrays[k] = torch.from_numpy(np.asarray(z["latents"], np.float32))
                labels = (
                    torch.from_numpy(np.asarray(z["labels"]).astype(np.int64))
                    if "labels" in z.files
                    else None
                )
                return tuple(self._arrays[k].shape), labels
        except DataError:
            raise
        except Exception as err:  # safetensors / zip / pickle errors of a damaged file
            raise DataError(f"data.path: cannot read latent shard {path}: {err}") from None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        r = i - int(self.offsets[k])
        if k in self._arrays:
            z = self._arrays[k][r]
        else:
            z = self._handles[k].get_slice("latents")[r : r + 1][0]
        labels = self._labels[k]
        label = (
            labels[r] if labels is not None and self.num_classes is not None else torch.tensor(0)
        )
        return z.float() * self.scale, label


def make_dataset(exp: E.Experiment, base: Path | None = None) -> ImageDataset:
    """The dataset of ``exp.data`` at the model's resolution and channels. With
    ``training.resolutions`` it must be able to change resolution (latents cannot:
    :class:`DataError` naming the field, before any step)."""
    dataset = _make_dataset(exp, base)
    if exp.training.resolutions is not None:
        dataset.set_resolution(tuple(exp.model_spec.input.resolution))  # type: ignore[arg-type]
    return dataset


def _make_dataset(exp: E.Experiment, base: Path | None = None) -> ImageDataset:
    spec = exp.model_spec
    res, ch = cast(tuple[int, int], tuple(spec.input.resolution)), spec.input.channels
    match exp.data:
        case E.DigitsData():
            return DigitsImages(res, ch)
        case E.ShapesData() as d:
            return ShapesDataset(d, res, ch)
        case E.ImageFolderData() as d:
            return ImageFolder(d, res, ch, base)
        case E.WebDatasetData() as d:
            cls = spec.conditioning.classes
            return WebDataset(d, res, ch, base, cls.count if cls is not None else None)
        case E.LatentsData() as d:
            return LatentShards(d, spec, base)
    raise DataError(f"data.kind {exp.data.kind!r} is not supported")


# -------------------------------------------------------------------------------- resolutions

RESOLUTION_STREAM = 0x5EED
"""Mixed into the seed of the resolution schedule, so it draws apart from the data order."""


def resolution_at(training: E.Training, step: int) -> tuple[int, int]:
    """The resolution of optimizer step ``step`` (0-based) of a run with
    ``training.resolutions``: ``choice(resolutions, p=probabilities)`` with the generator
    ``numpy.random.default_rng([seed, RESOLUTION_STREAM, step])``. A function of the seed and
    the step alone: every process of a launch agrees and a resumed run needs no saved state."""
    if training.resolutions is None:
        raise ValueError("resolution_at: training.resolutions is not set")
    p = training.resolution_probabilities()
    rng = np.random.default_rng([training.seed, RESOLUTION_STREAM, step])
    k = int(rng.choice(len(p), p=p))
    return training.resolutions[k]


def resolution_schedule(training: E.Training, start: int, stop: int) -> list[tuple[int, int]]:
    """:func:`resolution_at` for the steps ``start .. stop - 1``."""
    return [resolution_at(training, s) for s in range(start, stop)]


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

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        position: Position | None = None,
    ):
        if batch_size % world:
            raise ValueError(
                f"training.batch_size {batch_size} is not divisible by the {world} processes"
            )
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
            out += perm[self.position.offset : self.position.offset + take].tolist()
            self.position.offset += take
            if self.position.offset == len(perm):
                self.position = Position(self.position.epoch + 1, 0)
        return out

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next ``n`` global samples: ``(images, labels)``."""
        idx = self.next_indices(n)[self.rank :: self.world]
        if isinstance(self.dataset, ImageFolder):
            self.dataset.flip_seed = self.seed * 1_000_003 + self.position.epoch
        if isinstance(self.dataset, TensorImages):
            t = torch.as_tensor(idx)
            return self.dataset.images[t], self.dataset.labels[t]
        items = [self.dataset[i] for i in idx]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def state(self) -> dict:
        """The position, for checkpoints (the same on every rank)."""
        return vars(self.position).copy()

    def restore(self, state: dict) -> None:
        position = Position(**state)
        if position.offset >= len(self.dataset):  # a damaged state: never a silent other run
            raise DataError(
                f"the checkpoint's data position (epoch {position.epoch}, offset "
                f"{position.offset}) is past the end of the dataset "
                f"({len(self.dataset)} samples); the data or the checkpoint "
                "changed, resume from an earlier checkpoint"
            )
        self.position = position


@dataclass
class ShardPosition:
    """Where a shard stream is: the number of samples each rank has drawn (equal on every
    rank, since every rank takes the same share of each global batch)."""

    samples: int = 0


class ShardStream:
    """Batches from webdataset shards, split across ranks by shard: the shard sequence is
    epoch after epoch of ``permutation(shards, seed, epoch)``, and rank ``r`` reads shards
    ``r, r + world, r + 2 world, ...`` of it, each in its own seeded order (with seeded flips).
    The position is the count of samples each rank has drawn; a resumed run walks the shard
    sizes to the same shard and sample, so it draws exactly the batches the original would."""

    def __init__(
        self,
        dataset: WebDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        position: ShardPosition | None = None,
    ):
        if batch_size % world:
            raise ValueError(
                f"training.batch_size {batch_size} is not divisible by the {world} processes"
            )
        if len(dataset.shards) < world:
            raise DataError(
                f"data.shards: {len(dataset.shards)} shard(s) cannot be split "
                f"across {world} processes; write at least {world} shards"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world
        self._perm: tuple[int, np.ndarray] | None = None
        self.restore(vars(position or ShardPosition()))

    def _shard(self, j: int) -> tuple[int, int]:
        """``(epoch, shard index)`` of this rank's ``j``-th shard."""
        n = len(self.dataset.shards)
        epoch, i = divmod(self.rank + self.world * j, n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        return epoch, int(self._perm[1][i])

    def _open(self, j: int) -> None:
        epoch, shard = self._shard(j)
        n = len(self.dataset.samples(shard))
        rng = np.random.default_rng([self.seed, epoch, shard, 1])
        order, flips = rng.permutation(n), rng.random(n) < 0.5
        self._cur = (j, shard, order, flips & self.dataset.flip)

    def state(self) -> dict:
        return vars(self.position).copy()

    def restore(self, state: dict) -> None:
        self.position = ShardPosition(**state)
        j, left = 0, self.position.samples
        while True:
            size = len(self.dataset.samples(self._shard(j)[1]))
            if left < size:
                break
            left, j = left - size, j + 1
        self._open(j)
        self._within = left

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share (``n / world``) of the next ``n`` global samples."""
        images, labels = [], []
        for _ in range(n // self.world):
            j, shard, order, flips = self._cur
            if self._within == len(order):
                self._open(j + 1)
                self._within = 0
                j, shard, order, flips = self._cur
            k = int(order[self._within])
            img, label = self.dataset.read(shard, k, bool(flips[k]))
            images.append(img)
            labels.append(label)
            self._within += 1
            self.position.samples += 1
        return torch.stack(images), torch.stack(labels)


def make_stream(
    dataset: ImageDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1
) -> BatchStream | ShardStream:
    """The batch stream for ``dataset``: shard-wise for webdataset, index-wise otherwise."""
    if isinstance(dataset, WebDataset):
        return ShardStream(dataset, batch_size, seed, rank, world)
    return BatchStream(dataset, batch_size, seed, rank, world)
