"""FID (and precision / recall) between two sets of images with the standard Inception
weights, found locally.

A set of images is a folder (every image under it, recursively) or an ``.npz`` whose ``arr_0``
holds uint8 ``(N, H, W, 3)`` images -- what ``ditkit sample --npz`` writes and the ADM
evaluator's reference batches hold (their precomputed statistics are not used: features are
always computed here, from the images). ``fid_folders(real, fake)`` reads both (RGB, values
in [0, 1]), takes the 2048-d pool3 features of :class:`~ditkit.evaluate.inception.FIDInception`
(bilinear resize to 299, scaled to [-1, 1] -- pytorch-fid's preprocessing) and returns the
Fréchet distance of the two Gaussians fitted to them, plus improved precision and recall on
the same features (:mod:`ditkit.evaluate.metrics`). ditkit never downloads: the weights file
``pt_inception-2015-12-05-6726825d.pth`` is looked up, in order, at ``--fid-weights``,
``$DITKIT_FID_WEIGHTS`` and torch's hub cache (where pytorch-fid saves it).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import UnidentifiedImageError
from tqdm import tqdm

from ditkit.data.datasets import open_image
from ditkit.errors import UserError
from ditkit.evaluate.inception import WEIGHTS_FILE, FIDInception, load_fid_inception
from ditkit.evaluate.metrics import precision_recall
from ditkit.evaluate.npz import NpzError, iter_npz_images, npz_shape
from ditkit.evaluate.stats import (  # noqa: F401 (re-exported)
    _clean,
    frechet_from_stats,
    sqrtm_psd,
    trace_sqrt_product,
)
from ditkit.runtime.generate import sample_images
from ditkit.spec.sampling import EVALUATION_DEFAULTS, Sampling

ENV_VAR = "DITKIT_FID_WEIGHTS"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class FIDError(UserError):
    """A missing weights file, an empty or unreadable image folder: a usage error (exit 2)."""


# ----------------------------------------------------------------- the Fréchet distance


# The matrix functions live in ``ditkit.evaluate.stats`` (the extrapolation runner uses them
# too); they are re-exported here.


def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of the Gaussians fitted to the rows of ``a`` and ``b`` (unbiased
    covariances). With fewer images than features it never forms the covariances: for centred
    ``A``, ``B``, ``S_a S_b`` has the nonzero eigenvalues of ``M M^T`` with
    ``M = A B^T / sqrt((n_a - 1)(n_b - 1))``, so ``tr (S_a S_b)^(1/2)`` is the sum of ``M``'s
    singular values -- exact, symmetric and cheap (an ``n_a x n_b`` SVD, not two ``d x d``
    eigendecompositions)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    (na, d), nb = a.shape, len(b)
    if min(na, nb) < 2:
        raise FIDError(
            f"need at least 2 images on each side to fit a covariance, got {na} and {nb}"
        )
    if max(na, nb) >= d:
        return frechet_from_stats(*gaussian(a), *gaussian(b))
    ca, cb = a - a.mean(0), b - b.mean(0)
    m = (ca @ cb.T) / np.sqrt((na - 1) * (nb - 1))
    trace_sqrt = np.linalg.svd(m, compute_uv=False).sum()
    d2 = (
        ((a.mean(0) - b.mean(0)) ** 2).sum()
        + (ca**2).sum() / (na - 1)
        + (cb**2).sum() / (nb - 1)
        - 2 * trace_sqrt
    )
    return max(float(d2), 0.0)


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, like pytorch-fid) of feature rows."""
    f = np.asarray(features, np.float64)
    if len(f) < 2:
        raise FIDError(f"need at least 2 images to fit a covariance, got {len(f)}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


# ----------------------------------------------------------------- weights and images


def default_weights_path() -> Path:
    """``$DITKIT_FID_WEIGHTS``, else ``<torch hub dir>/checkpoints/<weights file>``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def missing_weights_message(path: Path) -> str:
    return (
        f"FID needs the Inception weights {WEIGHTS_FILE}, which are not at {path}. "
        "ditkit does not download them: fetch the file once on a machine with network "
        f"access ({WEIGHTS_URL}) and put it at {default_weights_path()} -- or anywhere, "
        f"then pass --fid-weights PATH or set {ENV_VAR}=PATH."
    )


def load_inception(path: str | Path | None = None, device: str = "cpu") -> FIDInception:
    path = Path(path).expanduser() if path else default_weights_path()
    if not path.is_file():
        raise FIDError(missing_weights_message(path))
    try:
        return load_fid_inception(path, device)
    except (ValueError, RuntimeError, OSError) as err:
        raise FIDError(str(err)) from None


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        what = (
            "is a file, not a folder of images or an .npz of uint8 images (arr_0)"
            if folder.is_file()
            else "no such folder of images"
        )
        raise FIDError(f"{folder}: {what}")
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        raise FIDError(
            f"{folder}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, "
            "sub-folders included)"
        )
    return files


def read_image(path: Path) -> torch.Tensor:
    """``(1, 3, 299, 299)`` RGB in [0, 1] (grey and palette images become RGB)."""

    try:
        with open_image(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise FIDError(f"{path}: cannot read the image ({err})") from None
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    # resizing each image alone equals resizing it in a batch (and 299 -> 299 is exact)
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


@torch.no_grad()
def folder_features(
    net: FIDInception,
    folder: str | Path,
    batch: int = 8,
    device: str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """``(N, 2048)`` pool3 features of every image under ``folder``."""

    files = image_files(folder)
    out = []
    for start in tqdm(
        range(0, len(files), batch),
        disable=not progress,
        unit="batch",
        desc=f"inception {Path(folder).name}",
    ):
        x = torch.cat([read_image(p) for p in files[start : start + batch]]).to(device)
        out.append(net(x).double().cpu().numpy())
    return np.concatenate(out)  # (N, FEATURES)


@torch.no_grad()
def npz_features(
    net: FIDInception, path: str | Path, batch: int = 8, device: str = "cpu", progress: bool = True
) -> np.ndarray:
    """``(N, 2048)`` pool3 features of ``arr_0`` (uint8 NHWC) of an ``.npz``, streamed."""

    try:
        n = npz_shape(path)[0]
        out = []
        for chunk in tqdm(
            iter_npz_images(path, batch),
            total=-(-n // batch),
            disable=not progress,
            unit="batch",
            desc=f"inception {Path(path).name}",
        ):
            x = torch.from_numpy(chunk.copy()).permute(0, 3, 1, 2).float() / 255  # (B, C, H, W)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            out.append(net(x.to(device)).double().cpu().numpy())
    except NpzError as err:
        raise FIDError(str(err)) from None
    if not out:
        raise FIDError(f"{path}: arr_0 holds no images")
    return np.concatenate(out)  # (N, FEATURES)


def check_source(source: str | Path) -> None:
    """Fail early (before loading weights) on a source that is neither an image folder nor an
    ``.npz`` of uint8 images."""
    path = Path(source)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FIDError(f"{path}: no such .npz file")
        try:
            npz_shape(path)
        except NpzError as err:
            raise FIDError(str(err)) from None
    else:
        image_files(path)


def source_features(
    net: FIDInception,
    source: str | Path,
    batch: int = 8,
    device: str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Features of an image folder or of an ``.npz`` (``arr_0``)."""
    if Path(source).suffix == ".npz":
        return npz_features(net, source, batch, device, progress)
    return folder_features(net, source, batch, device, progress)


@dataclass
class FIDReport:
    fid: float
    real: str
    fake: str
    real_count: int
    fake_count: int
    weights: str
    precision: float | None = None
    """Improved precision and recall (:mod:`ditkit.evaluate.metrics`) with ``k`` neighbours;
    ``None`` when not asked for or a set has ``k`` images or fewer."""
    recall: float | None = None
    k: int | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        pr = (
            ""
            if self.precision is None
            else f", precision {self.precision:.4f}, recall {self.recall:.4f} (k={self.k})"
        )
        return (
            f"FID {self.fid:.3f}{pr} ({self.fake_count} images in {self.fake} vs "
            f"{self.real_count} in {self.real})"
        )


def compare_features(
    f_real: np.ndarray, f_fake: np.ndarray, k: int | None = 3, device: str = "cpu"
) -> dict:
    """``{fid, precision, recall, k}`` of two feature sets; precision and recall are ``None``
    when ``k`` is ``None`` or a set has ``k`` images or fewer."""

    out = {
        "fid": frechet_from_features(f_real, f_fake),
        "precision": None,
        "recall": None,
        "k": None,
    }
    if k is not None and min(len(f_real), len(f_fake)) > k:
        out["precision"], out["recall"] = precision_recall(f_real, f_fake, k, device=device)
        out["k"] = k
    return out


def fid_folders(
    real: str | Path,
    fake: str | Path,
    weights: str | Path | None = None,
    batch: int = 8,
    device: str = "cpu",
    progress: bool = True,
    k: int | None = 3,
) -> FIDReport:
    """FID (and precision / recall with ``k`` neighbours; ``k=None``: FID only) between the
    images of ``real`` and those of ``fake``, each an image folder or an ``.npz``. Raises
    :class:`FIDError` for missing weights, an empty folder or an unreadable image."""
    check_source(real)  # fail on a bad source before loading weights
    check_source(fake)
    path = Path(weights).expanduser() if weights else default_weights_path()
    net = load_inception(path, device)
    f_real = source_features(net, real, batch, device, progress)
    f_fake = source_features(net, fake, batch, device, progress)
    return FIDReport(
        real=str(real),
        fake=str(fake),
        real_count=len(f_real),
        fake_count=len(f_fake),
        weights=str(path),
        **compare_features(f_real, f_fake, k, device),
    )


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """Model samples ``(N, C, H, W)`` in [-1, 1] -> ``(N, 3, 299, 299)`` in [0, 1], quantised
    to 8 bits as if saved as PNG (what folder-based FID of the same samples would read)."""

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round() / 255
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise FIDError(f"FID needs grey or RGB images; the samples have {x.shape[1]} channels")
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


@torch.no_grad()
def fid_model(
    model,
    spec,
    objective,
    real: str | Path,
    *,
    count: int = 500,
    sampling: Sampling = EVALUATION_DEFAULTS,
    weights: str | Path | None = None,
    batch: int = 8,
    device: str = "cpu",
    progress: bool = True,
    source: str = "model",
    k: int | None = 3,
) -> FIDReport:
    """FID (and precision / recall, ``k``) between ``count`` samples of a pixel-space model
    drawn with the settings ``sampling`` (default: 20 steps, seed 1, as an experiment's
    evaluation; labels cycling over its classes when class-conditional) and the images of
    ``real`` (a folder or an ``.npz``)."""

    if spec.input.space != "pixel":
        raise FIDError(
            "FID of a latent-space model needs its samples decoded to images; "
            "sample them into an .npz (ditkit sample CKPT --npz S.npz --vae VAE) and "
            "use --real REF --fake S.npz"
        )
    check_source(real)
    path = Path(weights).expanduser() if weights else default_weights_path()
    net = load_inception(path, device)
    f_real = source_features(net, real, batch, device, progress)
    images, _ = sample_images(model, spec, objective, count, sampling, device, progress=progress)
    x = to_inception_input(images)
    f_fake = np.concatenate(
        [
            net(x[i : i + batch].to(device)).double().cpu().numpy()
            for i in tqdm(
                range(0, len(x), batch),
                disable=not progress,
                unit="batch",
                desc="inception samples",
            )
        ]
    )
    return FIDReport(
        real=str(real),
        fake=f"{count} samples of {source}",
        real_count=len(f_real),
        fake_count=len(f_fake),
        weights=str(path),
        **compare_features(f_real, f_fake, k, device),
    )


__all__ = [
    "fid_folders",
    "fid_model",
    "to_inception_input",
    "folder_features",
    "npz_features",
    "source_features",
    "check_source",
    "compare_features",
    "frechet_from_stats",
    "frechet_from_features",
    "trace_sqrt_product",
    "sqrtm_psd",
    "gaussian",
    "load_inception",
    "default_weights_path",
    "FIDError",
    "FIDReport",
    "ENV_VAR",
    "WEIGHTS_URL",
]
