"""Run outputs besides checkpoints: CSV (and TensorBoard) scalars, image grids, the loss plot."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ditkit.errors import UserError
from ditkit.files import atomic_path
from ditkit.runtime.images import image_grid, save_png  # noqa: F401  (re-exported)


class Scalars:
    """``scalars.csv`` (one row per logged step) plus TensorBoard when it is installed.

    On resume the rows after the checkpoint's step are dropped, so the file reads as if the run
    had never stopped."""

    def __init__(
        self, run: Path, fields: list[str], resume_step: int | None = None, tensorboard: bool = True
    ):
        self.path = run / "scalars.csv"
        self.fields = fields
        rows: list[dict] = []
        if resume_step is not None and self.path.exists():
            try:
                with open(self.path, newline="", encoding="utf-8") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            except (ValueError, KeyError, TypeError, csv.Error) as err:  # UnicodeDecodeError too
                raise UserError(
                    f"{self.path}: damaged ({type(err).__name__}: "
                    f"{str(err)[:120]}); move it aside and resume again (the log "
                    "starts afresh; the checkpoints are intact)"
                ) from None
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        # the file was just replaced by ours; appending never follows a link planted since
        self.file = open(
            self.path, "a", newline="", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)
        )
        self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tensorboard"))
            except ImportError:  # the tensorboard package is optional
                self.tb = None

    def write(self, row: dict) -> None:
        self.writer.writerow({k: _fmt(v) for k, v in row.items()})
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v):
    return f"{v:.8g}" if isinstance(v, float) else v


def read_scalars(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [
            {k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)
        ]


def plot_loss(rows: list[dict[str, float]], path: Path, title: str = "") -> None:
    """Loss per step (and a moving average) on a log scale, as a PNG. Skipped (with a note on
    stderr) where matplotlib is not installed: it is an optional extra (``ditkit[diagram]``),
    and a finished training run must not fail over its picture."""
    try:
        import matplotlib
    except ImportError:
        import sys

        from ditkit.errors import missing_text

        print(
            f"note: {path} not drawn: {missing_text('matplotlib', 'the loss plot')}",
            file=sys.stderr,
        )
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "loss" in r]  # evaluation rows hold only eval/... values
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="loss")
    k = max(1, len(loss) // 20)
    if len(loss) > k > 1:
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if (loss > 0).all():
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
