"""The experiment's ``evaluation:`` block, run by the training loop.

:class:`RunEvaluation` is made once per run (on every process; only rank 0 evaluates). Before
the first step it checks what an evaluation will need -- the reference images, the Inception
weights, the autoencoder -- so a wrong path fails at once, not after hours of training. At each
step it is :meth:`~RunEvaluation.due` it samples ``count`` images from the (whole) EMA model
with the block's fixed seed, computes the metrics (digits: label accuracy and Fréchet distance;
shapes likewise, with their own classifier; a ``reference``: FID, precision, recall), writes
them as an ``eval/...`` row of the run's scalars, rewrites ``eval.json`` (the latest metrics,
the settings, and every evaluation so far) and ``samples.png`` (the first 100 samples, ten
per row). The reference features are computed once per run and kept in memory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ditkit.spec.experiment import Experiment

if TYPE_CHECKING:
    from collections.abc import Callable

    from ditkit.evaluate.classifier import ImageClassifier
    from ditkit.evaluate.fid import FIDInception

from ditkit.evaluate.classifier import LABELLED_DATA, classifier_for, evaluate_samples
from ditkit.evaluate.fid import (
    check_source,
    compare_features,
    load_inception,
    source_features,
    to_inception_input,
)
from ditkit.runtime.autoencoder import latent_decoder
from ditkit.runtime.generate import sample_images
from ditkit.training.checkpoints import write_json
from ditkit.training.logs import image_grid, save_png

EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.png"
LABEL_FIELDS = ["eval/accuracy", "eval/frechet"]
REFERENCE_FIELDS = ["eval/fid", "eval/precision", "eval/recall"]


class RunEvaluation:
    """What ``evaluation:`` asks for, ready to run on rank 0 (see the module docstring)."""

    def __init__(
        self,
        exp: Experiment,
        run: Path,
        device: torch.device,
        rank: int = 0,
        resume_step: int | None = None,
        n_classes: int | None = None,
    ):
        self.exp, self.ev, self.run, self.device = exp, exp.evaluation, Path(run), device
        self.rank, self.n_classes = rank, n_classes
        spec = exp.model_spec

        # label accuracy needs a built-in classifier of the data (digits, shapes)
        self.labelled = exp.data.kind in LABELLED_DATA and spec.conditioning.classes is not None
        self.fields = (LABEL_FIELDS if self.labelled else []) + (
            REFERENCE_FIELDS if self.ev.reference else []
        )
        self.history: list[dict] = []
        self._net: FIDInception | None = None
        self._decode: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._ref: np.ndarray | None = None
        self._clf: ImageClassifier | None = None
        if rank == 0:
            self._check()
            if resume_step is not None:
                self.history = [
                    h for h in _read_history(self.run / EVAL_FILE) if h["step"] <= resume_step
                ]

    @classmethod
    def create(
        cls,
        exp: Experiment,
        run: Path,
        device: torch.device,
        rank: int = 0,
        resume_step: int | None = None,
        n_classes: int | None = None,
    ):
        """``None`` when ``evaluation.enabled`` is false."""
        if not exp.evaluation.enabled:
            return None
        return cls(exp, run, device, rank, resume_step, n_classes)

    def due(self, step: int, total: int) -> bool:
        return step == total or bool(self.ev.every and step % self.ev.every == 0)

    # ------------------------------------------------------------------ set-up

    def _check(self) -> None:
        """Fail before training on a missing reference, weights file or autoencoder."""
        ev = self.ev
        if ev.reference is None:
            return

        check_source(ev.reference)
        self._net = load_inception(ev.inception, str(self.device))
        if ev.vae is not None:
            self._decode, _ = latent_decoder(
                self.exp.model_spec.input.channels, vae=ev.vae, device=self.device
            )

    # ------------------------------------------------------------------ one evaluation

    @torch.no_grad()
    def __call__(self, ema_model: nn.Module | None, step: int, scalars=None) -> dict | None:
        """Evaluate ``ema_model`` (a whole model; ``None`` on ranks other than 0, which do
        nothing) after ``step``: log the ``eval/...`` scalars and rewrite ``eval.json``.
        Returns the metrics on rank 0."""
        if ema_model is None or self.rank != 0:
            return None

        ev, spec, t0 = self.ev, self.exp.model_spec, time.perf_counter()
        # sample_images leaves the global RNG alone: evaluating does not change the run
        images, labels = sample_images(
            ema_model,
            spec,
            self.exp.objective,
            ev.count,
            ev.sampling,
            self.device,
            n_classes=self.n_classes,
        )

        scale = max(1, 32 // max(spec.input.resolution))
        grid = images if self._decode is None else self._decode(images[:100].to(self.device))
        save_png(
            image_grid(grid[:100].cpu(), min(10, len(grid)), scale=scale), self.run / SAMPLES_FILE
        )
        metrics: dict = {}
        if self.labelled:
            assert labels is not None  # drawn for n_classes
            metrics.update(self._labels(images, labels))
        if ev.reference is not None:
            metrics.update(self._reference(images))
        entry = {"step": step, **metrics, "seconds": time.perf_counter() - t0}
        self.history.append(entry)
        if scalars is not None:
            scalars.write(
                {
                    "step": step,
                    **{f"eval/{k}": v for k, v in metrics.items() if f"eval/{k}" in self.fields},
                }
            )
        write_json(self.run / EVAL_FILE, self.report())
        return entry

    def _labels(self, images: torch.Tensor, labels: torch.Tensor) -> dict:

        if self._clf is None:
            data = self.exp.data
            self._clf = classifier_for(
                data.kind, self.exp.model_spec.input.resolution, getattr(data, "classes", 10)
            )
        r = evaluate_samples(self._clf, images, labels)
        return {
            "accuracy": r.accuracy,
            "frechet": r.frechet,
            "frechet_real": r.frechet_real,
            "real_accuracy": r.real_accuracy,
            "per_class_accuracy": r.per_class_accuracy,
        }

    def _reference(self, images: torch.Tensor) -> dict:

        ev = self.ev
        assert self._net is not None and ev.reference is not None  # loaded by _check
        if self._ref is None:
            self._ref = source_features(
                self._net, ev.reference, ev.batch, str(self.device), progress=False
            )
        if self._decode is not None:
            images = torch.cat(
                [
                    self._decode(images[i : i + ev.batch].to(self.device)).cpu()
                    for i in range(0, len(images), ev.batch)
                ]
            )
        x = to_inception_input(images)
        feats = np.concatenate(
            [
                self._net(x[i : i + ev.batch].to(self.device)).double().cpu().numpy()
                for i in range(0, len(x), ev.batch)
            ]
        )
        out = compare_features(self._ref, feats, ev.k or None, str(self.device))
        return {
            "fid": out["fid"],
            "precision": out["precision"],
            "recall": out["recall"],
            "k": out["k"],
            "reference_count": len(self._ref),
        }

    def report(self) -> dict:
        """``eval.json``: the latest metrics, the settings and every evaluation so far."""
        return {
            "experiment": self.exp.name,
            "step": self.history[-1]["step"],
            "metrics": self.history[-1],
            "settings": self.ev.model_dump(mode="json"),
            "history": self.history,
        }


def _read_history(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    history = data.get("history") if isinstance(data, dict) else None
    return (
        [h for h in history if isinstance(h, dict) and "step" in h]
        if isinstance(history, list)
        else []
    )


__all__ = ["RunEvaluation", "EVAL_FILE", "SAMPLES_FILE"]
