"""Evaluation on the digits: does a class-conditional model draw the digit it is asked for,
and do its samples look like real digits to a classifier?

A small MLP (scikit-learn, fixed seed: deterministic) is trained on half of the real digits
(``fit``), at the model's resolution and preprocessing. For ``count`` class-conditional samples
we report

* ``accuracy``: the fraction the classifier labels as the requested class (for reference, its
  accuracy on the held-out real half, ``real_accuracy``);
* ``frechet``: the Fréchet distance between the Gaussians fitted to the classifier's hidden
  features (64-d) of the samples and of the ``fit`` half. ``frechet_real`` is the same distance
  for the *held-out* real half, also unseen by the classifier: what a perfect generator would
  score (up to the sample-size difference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data import digits_tensor


@dataclass
class DigitsReport:
    count: int
    accuracy: float
    frechet: float
    frechet_real: float
    real_accuracy: float
    per_class_accuracy: list[float]

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        return (f"label accuracy {self.accuracy:.1%} of {self.count} samples "
                f"(classifier on held-out real digits: {self.real_accuracy:.1%}); "
                f"Frechet distance {self.frechet:.2f} (real vs real: {self.frechet_real:.2f})")


class DigitsClassifier:
    """A deterministic MLP on real digits at ``resolution`` (grey, [-1, 1])."""

    def __init__(self, resolution: tuple[int, int], hidden: int = 64, seed: int = 0):
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        x, y = digits_tensor(tuple(resolution), 1)
        x = x.flatten(1).numpy().astype(np.float64)
        y = y.numpy()
        self.x_fit, self.x_held, self.y_fit, self.y_held = train_test_split(
            x, y, test_size=0.5, random_state=seed, stratify=y)
        self.clf = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=500,
                                 random_state=seed)
        import warnings

        from threadpoolctl import threadpool_limits

        # one BLAS thread: as fast for this size, and far faster on a shared machine
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")
            self.clf.fit(self.x_fit, self.y_fit)
        self.resolution = tuple(resolution)
        self.real_accuracy = float((self.clf.predict(self.x_held) == self.y_held).mean())

    def prepare(self, images: torch.Tensor) -> np.ndarray:
        """``(N, C, H, W)`` samples -> flat grey arrays like the training data."""
        x = images.detach().float().cpu().clamp(-1, 1)
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        if tuple(x.shape[-2:]) != self.resolution:
            raise ValueError(f"samples are {tuple(x.shape[-2:])}, the classifier was trained at "
                             f"{self.resolution}")
        return x.flatten(1).numpy().astype(np.float64)

    def features(self, x: np.ndarray) -> np.ndarray:
        """The hidden layer's ReLU activations."""
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.clf.predict(x)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of Gaussians fitted to rows
    (stable when features are constant: dead ReLU units make the covariances singular)."""
    from .fid import frechet_from_stats

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return frechet_from_stats(mu_a, s_a, mu_b, s_b)


def evaluate_samples(clf: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor
                     ) -> DigitsReport:
    x = clf.prepare(images)
    labels = labels.cpu().numpy()
    pred = clf.predict(x)
    per_class = [float((pred[labels == k] == k).mean()) if (labels == k).any() else float("nan")
                 for k in range(10)]
    ref = clf.features(clf.x_fit)
    return DigitsReport(
        count=len(labels), accuracy=float((pred == labels).mean()),
        frechet=frechet_distance(clf.features(x), ref),
        frechet_real=frechet_distance(clf.features(clf.x_held), ref),
        real_accuracy=clf.real_accuracy, per_class_accuracy=per_class)


def evaluate_model(model, spec, objective, *, count: int = 500, steps: int = 20,
                   sampler: str = "heun", cfg_scale: float = 1.0, seed: int = 1,
                   device: str = "cpu", progress: bool = False
                   ) -> tuple[DigitsReport, torch.Tensor, torch.Tensor]:
    """Sample ``count`` digits (labels cycling 0..9) and evaluate them:
    ``(report, images, labels)``."""
    from .loop import sample_images

    if spec.conditioning.classes is None or spec.conditioning.classes.count < 10:
        raise ValueError("digits evaluation needs a model conditioned on (at least) 10 classes "
                         "(conditioning.classes.count)")
    if spec.input.channels not in (1, 3):
        raise ValueError(f"digits evaluation needs 1 or 3 input channels, the model has "
                         f"{spec.input.channels}")
    clf = DigitsClassifier(tuple(spec.input.resolution))
    images, labels = sample_images(model, spec, objective, count, steps, sampler, seed,
                                   cfg_scale, device, n_classes=10, progress=progress)
    return evaluate_samples(clf, images, labels), images, labels
