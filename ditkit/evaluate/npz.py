"""Many samples into one ``.npz``: the file the ADM evaluator (and ``ditkit evaluate``) reads.

``sample_npz`` draws ``num`` samples and writes ``arr_0``, uint8 ``(N, H, W, 3)`` (grey images
are repeated into RGB), and, for class-conditional sampling, ``arr_1``: the int64 labels -- the
layout of guided-diffusion's ``image_sample.py``. DiT's ``sample_ddp.py`` makes the same
``arr_0``. ``ditkit_settings`` records how the file was made (sampler, steps, seed, batch,
guidance, the checkpoint's hash, the decoder) as JSON bytes, so the file describes itself;
evaluators that read ``arr_0`` ignore it.

**Chunks.** The ``num`` samples are cut into chunks of ``batch``; chunk ``k`` (samples
``k*batch ...``) is drawn with seed ``seed + k`` and its slice of the labels, so its images do
not depend on how many processes share the work, nor on the order chunks run in. Each finished
chunk is written atomically as ``<out>.parts/part-<k>.npz``; a run that stops (crash, time
limit, Ctrl-C) is continued by running the same command again: finished parts are kept (checked
against the labels they must hold), missing ones are drawn. ``settings.json`` in that folder
records what the parts were drawn with, and a run with other settings is refused instead of
mixing two sets of samples.

**Processes.** Under ``torchrun`` (``WORLD_SIZE`` > 1) process ``r`` draws chunks ``r, r +
world, ...``; once all are done (a barrier), rank 0 streams the parts into ``<out>`` (one
chunk in memory at a time, so 50,000 images of 512 x 512 need no 39 GB array) and removes the
parts folder. The parts folder must be on a file system every process sees.

Parts are plain ``np.savez`` files without object arrays and are read with
``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ditkit.device import pick_device
from ditkit.errors import UserError
from ditkit.files import atomic_path
from ditkit.runtime.multistage import sample_staged
from ditkit.spec.limits import KEPT_PER_SAMPLE, check_run_bytes
from ditkit.spec.sampling import Sampling

SETTINGS = "settings.json"
SETTINGS_KEY = "ditkit_settings"
RUN_KEY = "ditkit_run"


class NpzError(UserError):
    """A bad ``.npz`` (not uint8 NHWC images), an existing output, or parts drawn with other
    settings: a usage error (exit 2)."""


# -------------------------------------------------------------------------------- processes


@dataclass
class Processes:
    """This process's place under ``torchrun``: ``rank`` of ``world``, and the device it
    samples on (``cuda`` becomes ``cuda:<LOCAL_RANK>``)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    created: bool = False
    """Whether :func:`processes` started the process group (and :meth:`close` ends it)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.created:
            dist.destroy_process_group()
            self.created = False


def processes(device: str = "cpu") -> Processes:
    """Join the ``torchrun`` process group (gloo on CPU, nccl on CUDA) when ``WORLD_SIZE`` > 1;
    one process otherwise. Call it before loading the model: it picks the device."""

    dev = pick_device(str(device))  # cuda -> cuda:<LOCAL_RANK> (ditkit.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(device=str(dev))

    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        created = True
    return Processes(dist.get_rank(), dist.get_world_size(), str(dev), created)


# -------------------------------------------------------------------------------- images


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, H, W, 3)`` uint8, rounded as the PNG writers do
    (grey is repeated into RGB)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise NpzError(
            f"an .npz holds grey or RGB images (N, C, H, W) with C 1 or 3; got "
            f"shape {tuple(images.shape)} (a latent-space model needs its decoder)"
        )
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3)


def write_npz(
    path: str | os.PathLike,
    chunks: Iterator[np.ndarray],
    count: int,
    labels: np.ndarray | None = None,
    settings: dict | None = None,
) -> tuple[int, int, int, int]:
    """Stream uint8 ``(n, H, W, C)`` chunks into ``arr_0`` of an uncompressed ``.npz`` (as
    ``np.savez`` writes it; zip64, so any size), plus ``labels`` as ``arr_1`` and ``settings``
    as ``ditkit_settings`` (JSON text as uint8 bytes: no pickle; :func:`npz_settings` reads
    it); atomic. The chunks must add up to ``count`` images of one size. Returns ``arr_0``'s
    shape."""
    chunks = iter(chunks)
    first = next(chunks, None)
    if first is None or first.ndim != 4 or first.dtype != np.uint8:
        raise NpzError(f"{path}: nothing to write (expected uint8 (n, H, W, C) chunks)")
    shape = (count, *first.shape[1:])
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": shape,
    }
    written = 0
    with (
        atomic_path(path) as tmp,
        zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for chunk in (first, *chunks):
                if chunk.shape[1:] != shape[1:] or chunk.dtype != np.uint8:
                    raise NpzError(
                        f"{path}: a chunk of shape {chunk.shape} ({chunk.dtype}) "
                        f"does not fit {shape[1:]} uint8"
                    )
                f.write(np.ascontiguousarray(chunk).tobytes())
                written += len(chunk)
        if written != count:
            raise NpzError(f"{path}: the chunks hold {written} images, not {count}")
        if labels is not None:
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(labels, np.int64), allow_pickle=False)
        if settings is not None:
            text = np.frombuffer(json.dumps(settings, sort_keys=True).encode(), np.uint8)
            with zf.open(f"{SETTINGS_KEY}.npy", "w") as f:
                np.lib.format.write_array(f, text, allow_pickle=False)
    return shape


def npz_settings(path: str | os.PathLike) -> dict | None:
    """The settings ``sample_npz`` recorded in an ``.npz`` (``None`` for other files)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if SETTINGS_KEY not in z.files:
                return None
            return json.loads(z[SETTINGS_KEY].tobytes().decode())
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise NpzError(f"{path}: unreadable settings ({err})") from None


def _open_arr0(zf: zipfile.ZipFile, path) -> tuple:
    if "arr_0.npy" not in zf.namelist():
        raise NpzError(
            f"{path}: no arr_0 in the .npz (keys: "
            f"{', '.join(n.removesuffix('.npy') for n in zf.namelist())})"
        )
    f = zf.open("arr_0.npy")
    version = np.lib.format.read_magic(f)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read(f)
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[-1] not in (1, 3):
        f.close()
        raise NpzError(
            f"{path}: arr_0 must be uint8 images (N, H, W, 3) as the ADM evaluator "
            f"reads them; got {dtype} {shape}{' (Fortran order)' if fortran else ''}"
        )
    if min(shape) < 1:
        f.close()
        raise NpzError(
            f"{path}: arr_0 has shape {tuple(shape)}: no images or images of no "
            "pixels; an .npz of samples holds (N, H, W, 3) with every size positive"
        )
    claimed = int(np.prod(shape, dtype=object))
    held = zf.getinfo("arr_0.npy").file_size
    if claimed > held:  # the header is read before any buffer is made from it
        f.close()
        raise NpzError(
            f"{path}: arr_0's header claims {tuple(shape)} ({claimed:,} bytes) but "
            f"the file holds {held:,} bytes; the file is damaged"
        )
    return f, tuple(shape)


def npz_shape(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """``arr_0``'s shape, read from its header only."""
    try:
        with zipfile.ZipFile(path) as zf:
            f, shape = _open_arr0(zf, path)
            f.close()
    except NpzError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise NpzError(f"{path}: not a readable .npz ({err})") from None
    return shape


def iter_npz_images(path: str | os.PathLike, batch: int = 64) -> Iterator[np.ndarray]:
    """``arr_0`` in uint8 ``(n, H, W, C)`` chunks of ``batch``, streamed from the zip member
    (memory: one chunk), without unpickling anything."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise NpzError(f"{path}: not a readable .npz ({err})") from None
    with zf:
        f, (n, h, w, c) = _open_arr0(zf, path)
        with f:
            per = h * w * c
            for start in range(0, n, batch):
                k = min(batch, n - start)
                buf = f.read(k * per)
                if len(buf) != k * per:
                    raise NpzError(f"{path}: arr_0 ends after {start} of {n} images")
                yield np.frombuffer(buf, np.uint8).reshape(k, h, w, c)


def read_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """``(arr_0, arr_1 or None)`` of a small file, with ``allow_pickle=False``."""
    npz_shape(path)  # the header against the file's size, before numpy allocates from it
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["arr_0"]
            labels = z["arr_1"] if "arr_1" in z.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise NpzError(f"{path}: not a readable .npz of images ({err})") from None
    return images, labels


# -------------------------------------------------------------------------------- sampling


@dataclass
class NpzResult:
    path: Path
    shape: tuple[int, ...] | None
    """``arr_0``'s shape (``None`` on ranks other than 0, which do not write it)."""
    drawn: int
    """Samples this process drew in this call (0 when everything was already there)."""
    reused: int
    """Samples this process found already drawn by an earlier, interrupted run."""


def parts_folder(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def chunks_of(num: int, batch: int) -> list[tuple[int, int, int]]:
    """``[(k, start, n)]``: chunk ``k`` holds samples ``start .. start + n``."""
    return [(k, s, min(batch, num - s)) for k, s in enumerate(range(0, num, batch))]


def _labels_hash(labels: np.ndarray | None) -> str | None:
    return None if labels is None else hashlib.sha256(labels.tobytes()).hexdigest()


def _settings(parts: Path, settings: dict, proc: Processes) -> None:
    """Write ``settings.json`` (rank 0) or refuse parts drawn with other settings."""
    path = parts / SETTINGS
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != settings:
            diff = ["unreadable"]
            if isinstance(old, dict):  # keys on either side: a setting may be new or gone
                keys = [*settings, *(k for k in old if k not in settings)]
                diff = [
                    f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
                    for k in keys
                    if old.get(k) != settings.get(k)
                ]
            raise NpzError(
                f"{parts} holds samples drawn with other settings ({'; '.join(diff)}"
                f"); rerun with the earlier settings to continue, or delete {parts} "
                "to start over"
            )
    elif proc.main:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(settings, indent=2) + "\n")


class ForeignPart(NpzError):
    """A part file of another run (or of none) found in a run's parts folder."""


def run_id(settings: dict) -> str:
    """The identity of a run's settings, written into each of its part files."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _part_ok(path: Path, n: int, labels: np.ndarray | None, run: str | None = None) -> bool:
    """A finished part: ``arr_0`` of ``n`` uint8 RGB images (its header is enough: parts are
    renamed into place only once complete), exactly the labels its chunk must hold and this
    run's identity (``run``, see :func:`run_id`). A part without one is drawn again; a part
    that carries another run's is refused (:class:`ForeignPart`): never merged, nor
    silently replaced."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise NpzError(
            f"{path}: not a regular file; delete it (parts are written by ditkit sample --npz only)"
        )
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            owner = None
            if f"{RUN_KEY}.npy" in names:
                with zf.open(f"{RUN_KEY}.npy") as g:
                    owner = np.lib.format.read_array(g, allow_pickle=False).tobytes().decode()
            if owner is None and run is not None:
                return False  # no identity (damaged, or an older ditkit's): drawn again
            if run is not None and owner != run:
                raise ForeignPart(
                    f"{path} was drawn by another run (other settings, checkpoint or "
                    f"labels); it is not merged. Delete it, or the whole "
                    f"{path.parent}, to draw it again"
                )
            f, shape = _open_arr0(zf, path)
            f.close()
            got = None
            if "arr_1.npy" in names:
                with zf.open("arr_1.npy") as g:
                    got = np.lib.format.read_array(g, allow_pickle=False)
    except ForeignPart:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError):
        return False  # damaged (NpzError included): drawn again
    if shape[0] != n or shape[-1] != 3:
        return False
    if labels is None:
        return got is None
    return got is not None and np.array_equal(got, labels)


def draw_chunk(
    denoiser,
    k: int,
    start: int,
    n: int,
    labels: np.ndarray | None,
    *,
    shape: tuple[int, int, int],
    sampling: Sampling,
    decode: Callable[[torch.Tensor], torch.Tensor] | None,
    device: str,
) -> torch.Tensor:
    """Chunk ``k`` of :func:`sample_npz` (samples ``start .. start + n - 1``, seed
    ``sampling.seed + k``) on ``device``, decoded when ``decode`` is given; a non-finite value
    is an error."""

    x = sample_staged(
        denoiser,
        (n, *shape),
        sampling,
        seed=sampling.seed + k,
        class_labels=None if labels is None else torch.from_numpy(labels),
        device=device,
    )
    if decode is not None:
        x = decode(x)
    if not torch.isfinite(x).all():
        raise NpzError(
            f"chunk {k} (samples {start}..{start + n - 1}, seed {sampling.seed + k}) "
            "holds non-finite values; nothing was written for it"
        )
    return x


def sample_npz(
    denoiser,
    out: str | os.PathLike,
    sampling: Sampling | None = None,
    *,
    num: int,
    shape: tuple[int, int, int],
    batch: int = 32,
    class_labels: torch.Tensor | np.ndarray | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    identity: dict | None = None,
    proc: Processes | None = None,
    device: str = "cpu",
    progress: bool = True,
    **settings,
) -> NpzResult:
    """Draw ``num`` samples of ``shape`` ``(C, H, W)`` from ``denoiser`` with the settings
    ``sampling`` (a :class:`ditkit.spec.sampling.Sampling`; ``settings`` are its fields given
    one by one, as for :func:`ditkit.runtime.samplers.sample`) into the ``.npz`` ``out``;
    chunk ``k`` uses seed ``sampling.seed + k``. See the module docstring for chunks, resuming
    and processes: every sampling setting is recorded, so a resume with any other one is
    refused. ``decode`` maps a batch of latent samples to images in [-1, 1]; ``identity``
    (JSON data: the checkpoint's hash, the decoder) joins the settings a resumed run must
    match. Collective under ``torchrun``: every process calls it with the same arguments
    (``proc`` from :func:`processes`)."""
    sampling = Sampling.of(sampling, **settings)

    proc = proc or Processes(device=str(device))
    out = Path(out)
    if num < 1 or batch < 1:
        raise NpzError(f"num {num} and batch {batch}: both must be positive")
    if out.exists():
        raise NpzError(f"{out} already exists; choose another path or delete it")
    labels = None
    if class_labels is not None:
        labels = np.asarray(torch.as_tensor(class_labels).cpu(), dtype=np.int64).reshape(-1)
        if len(labels) != num:
            raise NpzError(f"{len(labels)} class labels for {num} samples; give one per sample")

    c, h, w = shape
    check_run_bytes(
        num * KEPT_PER_SAMPLE + min(batch, num) * c * h * w * 4 * 8,
        f"--count {num}",
        f"{num:,} samples in batches of {batch}",
    )
    parts = parts_folder(out)
    if parts.is_symlink() or (parts.exists() and not parts.is_dir()):
        raise NpzError(
            f"{parts}: not a folder (a symbolic link or a file); the parts of "
            f"{out} are written to a real folder there: remove it and rerun"
        )
    settings = {
        "num": num,
        "batch": batch,
        "shape": list(shape),
        **sampling.recorded(),
        "labels_sha256": _labels_hash(labels),
        **(identity or {}),
    }
    settings = json.loads(json.dumps(settings))  # as it reads back from the file
    if proc.main:
        parts.mkdir(parents=True, exist_ok=True)
    proc.barrier()
    _settings(parts, settings, proc)
    chunks = chunks_of(num, batch)
    mine = [c for c in chunks if c[0] % proc.world == proc.rank]

    def lab(start: int, n: int):
        return None if labels is None else labels[start : start + n]

    run = run_id(settings)
    todo = [
        c for c in mine if not _part_ok(parts / f"part-{c[0]:06d}.npz", c[2], lab(c[1], c[2]), run)
    ]
    reused = sum(n for _, _, n in mine) - sum(n for _, _, n in todo)

    who = f" (process {proc.rank} of {proc.world})" if proc.world > 1 else ""
    bar = tqdm(
        total=sum(n for _, _, n in mine),
        initial=reused,
        unit="img",
        desc=f"sampling {out.name}{who}",
        disable=not (progress and proc.main),
        dynamic_ncols=True,
    )
    try:
        for k, start, n in todo:
            y = lab(start, n)
            x = draw_chunk(
                denoiser,
                k,
                start,
                n,
                y,
                shape=shape,
                sampling=sampling,
                decode=decode,
                device=proc.device,
            )
            images = to_uint8(x)
            with atomic_path(parts / f"part-{k:06d}.npz") as tmp, open(tmp, "wb") as f:
                arrays = {"arr_0": images, RUN_KEY: np.frombuffer(run.encode(), np.uint8)}
                if y is not None:
                    arrays["arr_1"] = y
                # mypy matches a **dict against savez's allow_pickle: bool keyword
                np.savez(f, **arrays)  # type: ignore[arg-type]
            bar.update(n)
    finally:
        bar.close()
    proc.barrier()
    result = NpzResult(out, None, sum(n for _, _, n in todo), reused)
    if proc.main:
        missing = [k for k, s, n in chunks if not (parts / f"part-{k:06d}.npz").is_file()]
        if missing:
            raise NpzError(
                f"{parts}: parts {missing[:5]} are missing after sampling; rerun "
                "the command to draw them"
            )

        def stream():
            for k, _, _ in chunks:
                yield read_npz(parts / f"part-{k:06d}.npz")[0]

        result.shape = write_npz(out, stream(), num, labels, settings)
        shutil.rmtree(parts)
    return result


__all__ = [
    "sample_npz",
    "draw_chunk",
    "write_npz",
    "read_npz",
    "iter_npz_images",
    "npz_shape",
    "npz_settings",
    "to_uint8",
    "processes",
    "Processes",
    "parts_folder",
    "chunks_of",
    "NpzError",
    "NpzResult",
]
