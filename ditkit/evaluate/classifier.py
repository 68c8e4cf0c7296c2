"""Evaluation on the digits and the shapes: does a class-conditional model draw the class it is
asked for, and do its samples look like real images to a classifier?

A small MLP (scikit-learn, fixed seed: deterministic) is trained on half of the real images
(``fit``): digits at the model's resolution and preprocessing; shapes rendered at the evaluated
resolution and reduced to a fixed 32x32 grey input (:class:`ShapesClassifier` says why).
For ``count`` class-conditional samples we report

* ``accuracy``: the fraction the classifier labels as the requested class (for reference, its
  accuracy on the held-out real half, ``real_accuracy``);
* ``frechet``: the Fréchet distance between the Gaussians fitted to the classifier's hidden
  features (64-d) of the samples and of the ``fit`` half. ``frechet_real`` is the same distance
  for the *held-out* real half, also unseen by the classifier: what a perfect generator would
  score (up to the sample-size difference).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from ditkit.data.datasets import digits_tensor, resize_images, shape_image
from ditkit.errors import UserError
from ditkit.evaluate.fid import frechet_from_stats
from ditkit.evaluate.stats import FrechetToReference
from ditkit.runtime.generate import sample_images
from ditkit.spec.experiment import LABELLED_DATA
from ditkit.spec.sampling import EVALUATION_DEFAULTS, Sampling


class EvaluationError(UserError):
    """Samples or a model the built-in classifiers cannot score (the message says why)."""


@dataclass
class LabelReport:
    count: int
    accuracy: float
    frechet: float
    frechet_real: float
    real_accuracy: float
    per_class_accuracy: list[float]
    data: str = "digits"

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        return (
            f"label accuracy {self.accuracy:.1%} of {self.count} samples "
            f"(classifier on held-out real {self.data}: {self.real_accuracy:.1%}); "
            f"Frechet distance {self.frechet:.2f} (real vs real: {self.frechet_real:.2f})"
        )


DigitsReport = LabelReport  # the name it had when only the digits were evaluated


class ImageClassifier:
    """A deterministic MLP (scikit-learn, fixed seed) on real images, grey and flattened at
    ``input_size``; half of the real images fit it (``x_fit``), half are held out."""

    data = "images"  # what the real images are, for reports (each subclass names its own)

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        input_size: tuple[int, int],
        n_classes: int,
        hidden: int = 64,
        seed: int = 0,
        max_iter: int = 500,
    ):
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        self.input_size, self.n_classes = cast(tuple[int, int], tuple(input_size)), n_classes
        x = self.prepare(images)
        y = labels.numpy()
        self.x_fit, self.x_held, self.y_fit, self.y_held = train_test_split(
            x, y, test_size=0.5, random_state=seed, stratify=y
        )
        self.clf = MLPClassifier(
            hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=max_iter, random_state=seed
        )

        # one BLAS thread: as fast for this size, and far faster on a shared machine
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")
            self.clf.fit(self.x_fit, self.y_fit)
        self.real_accuracy = float((self.clf.predict(self.x_held) == self.y_held).mean())

    def prepare(self, images: torch.Tensor) -> np.ndarray:
        """``(N, C, H, W)`` images in [-1, 1] -> flat grey arrays at ``input_size``."""

        x = images.detach().float().cpu().clamp(-1, 1)
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        x = resize_images(x, self.input_size)
        return x.flatten(1).numpy().astype(np.float64)

    def features(self, x: np.ndarray) -> np.ndarray:
        """The hidden layer's ReLU activations."""
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.clf.predict(x)


class DigitsClassifier(ImageClassifier):
    """The MLP on real digits at ``resolution`` (grey, [-1, 1])."""

    data = "digits"

    def __init__(self, resolution: tuple[int, int], hidden: int = 64, seed: int = 0):
        x, y = digits_tensor(cast(tuple[int, int], tuple(resolution)), 1)
        self.resolution = cast(tuple[int, int], tuple(resolution))
        super().__init__(x, y, self.resolution, 10, hidden, seed)

    def prepare(self, images: torch.Tensor) -> np.ndarray:
        if tuple(images.shape[-2:]) != self.resolution:
            raise EvaluationError(
                f"samples are {tuple(images.shape[-2:])}, the classifier "
                f"was trained at {self.resolution}"
            )
        return super().prepare(images)


class ShapesClassifier(ImageClassifier):
    """The MLP on real procedural shapes (``ditkit.data.datasets.shape_image``), rendered at the
    *evaluated* ``resolution`` -- shapes exist at any size, so the real reference is exact
    there, not an upsampled 32x32 image -- then reduced (antialiased) to grey at
    ``min(resolution, input_size)``. The fixed classifier input keeps the cost and the
    feature space the same at every resolution (so Fréchet numbers compare across columns);
    the price is that artefacts finer than ``input_size`` are averaged away. Shape, not colour,
    decides the class, so grey loses nothing the classifier needs.

    ``count`` real images (half fit the classifier, half are held out) use ``seed``, which by
    default differs from the training data's seed 0."""

    data = "shapes"

    def __init__(
        self,
        resolution: tuple[int, int],
        classes: int = 10,
        count: int = 3000,
        input_size: int = 32,
        hidden: int = 64,
        seed: int = 1234,
    ):

        self.resolution = cast(tuple[int, int], tuple(resolution))
        x = torch.from_numpy(
            np.stack([shape_image(i, i % classes, self.resolution, seed) for i in range(count)])
        )
        y = torch.arange(count) % classes
        size = (min(self.resolution[0], input_size), min(self.resolution[1], input_size))
        super().__init__(x, y, size, classes, hidden, 0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of Gaussians fitted to rows
    (stable when features are constant: dead ReLU units make the covariances singular)."""

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return frechet_from_stats(mu_a, s_a, mu_b, s_b)


def classify(clf: ImageClassifier, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's predicted labels and hidden features of ``images``."""
    x = clf.prepare(images)
    return clf.predict(x), clf.features(x)


def evaluate_samples(
    clf: ImageClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    matched_reference: bool = False,
    classified: tuple[np.ndarray, np.ndarray] | None = None,
) -> LabelReport:
    """Accuracy and Fréchet distance of ``images`` asked to show ``labels``. The reference
    ``frechet_real`` uses the whole held-out real half, or with ``matched_reference`` only as
    many held-out images as there are samples (the Fréchet distance of a small set is biased
    upwards, so a small sample is compared with an equally small real set). ``classified``:
    :func:`classify`'s result for ``images``, when the caller has it already."""
    pred, features = classified if classified is not None else classify(clf, images)
    want = labels.cpu().numpy()
    per_class = [
        float((pred[want == k] == k).mean()) if (want == k).any() else float("nan")
        for k in range(clf.n_classes)
    ]
    ref = clf.features(clf.x_fit)
    held = clf.x_held[: len(want)] if matched_reference else clf.x_held
    return LabelReport(
        count=len(want),
        accuracy=float((pred == want).mean()),
        frechet=frechet_distance(features, ref),
        frechet_real=frechet_distance(clf.features(held), ref),
        real_accuracy=clf.real_accuracy,
        per_class_accuracy=per_class,
        data=clf.data,
    )


def classifier_for(
    data_kind: str, resolution: tuple[int, int], classes: int = 10, **args
) -> ImageClassifier:
    """The evaluation classifier for a data kind (``digits`` or ``shapes``) at a resolution;
    ``args`` go to :class:`ShapesClassifier` (e.g. ``count``)."""
    if data_kind == "digits":
        return DigitsClassifier(cast(tuple[int, int], tuple(resolution)))
    if data_kind == "shapes":
        return ShapesClassifier(cast(tuple[int, int], tuple(resolution)), classes, **args)
    raise EvaluationError(
        f"no built-in evaluation for data kind {data_kind!r}; use digits or shapes"
    )


class ResolutionMetrics:
    """Scores per resolution, ``metrics(images, labels) -> dict``, with accuracy, Fréchet
    distance and the matched real-vs-real Fréchet distance, and under ``per_sample`` what the
    extrapolation report's confidence intervals and paired tests need (its
    ``ClassifierScorer`` turns this dict into typed ``Scores``): which samples
    were classified right, their features and the Fréchet distance to the reference
    (:class:`ditkit.evaluate.stats.FrechetToReference`). One classifier per resolution, built
    on first use."""

    def __init__(self, data_kind: str, classes: int = 10, **classifier_args):
        self.data_kind, self.classes, self.args = data_kind, classes, classifier_args
        self._classifiers: dict[tuple[int, int], ImageClassifier] = {}
        self._references: dict = {}

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        res = (int(images.shape[-2]), int(images.shape[-1]))
        if res not in self._classifiers:
            self._classifiers[res] = classifier_for(self.data_kind, res, self.classes, **self.args)
        clf = self._classifiers[res]
        pred, features = classify(clf, images)
        r = evaluate_samples(
            clf, images, labels, matched_reference=True, classified=(pred, features)
        )
        if res not in self._references:
            ref = clf.features(clf.x_fit)
            self._references[res] = FrechetToReference(ref.mean(0), np.cov(ref, rowvar=False))
        paired = {
            "correct": pred == labels.cpu().numpy(),
            "features": features,
            "frechet": self._references[res],
        }
        return {
            "accuracy": r.accuracy,
            "frechet": r.frechet,
            "frechet_real": r.frechet_real,
            "real_accuracy": r.real_accuracy,
            "count": r.count,
            "per_sample": paired,
        }


def evaluate_model(
    model,
    spec,
    objective,
    *,
    count: int = 500,
    sampling: Sampling = EVALUATION_DEFAULTS,
    device: str = "cpu",
    progress: bool = False,
    data: str = "digits",
    classes: int = 10,
) -> tuple[LabelReport, torch.Tensor, torch.Tensor]:
    """Sample ``count`` images of ``data`` (``digits`` or ``shapes``; labels cycling over its
    ``classes``) with the settings ``sampling`` (default: 20 steps, seed 1, as an
    experiment's evaluation) and evaluate them with that data's classifier at the model's
    resolution: ``(report, images, labels)``."""

    if data not in LABELLED_DATA:
        raise EvaluationError(
            f"no built-in label evaluation for data kind {data!r}: use "
            "digits or shapes (or FID with --real)"
        )
    if spec.conditioning.classes is None or spec.conditioning.classes.count < classes:
        raise EvaluationError(
            f"{data} evaluation needs a model conditioned on (at least) "
            f"{classes} classes (conditioning.classes.count)"
        )
    if spec.input.channels not in (1, 3):
        raise EvaluationError(
            f"{data} evaluation needs 1 or 3 input channels, the model has {spec.input.channels}"
        )
    clf = classifier_for(data, cast(tuple[int, int], tuple(spec.input.resolution)), classes)
    images, labels = sample_images(
        model, spec, objective, count, sampling, device, n_classes=classes, progress=progress
    )
    assert labels is not None  # drawn for n_classes
    return evaluate_samples(clf, images, labels), images, labels
