"""Tiny experiments for the training tests (8x8 grey digits, a two-level model, ~40k params)."""

from __future__ import annotations

import pytest

from ditkit.spec.experiment import experiment_from_data


def tiny_model(noise: str = "fourier", learned_sigma: bool = False) -> dict:
    return {
        "name": "test-tiny",
        "input": {"channels": 1, "resolution": [8, 8]},
        "patch": {"size": 2, "bias": False},
        "conditioning": {
            "width": 32,
            "noise": {"kind": noise},
            "classes": {"count": 10},
            "mapping": {"depth": 1, "ratio": 2.0},
        },
        "block": {
            "d_head": 16,
            "logits": {"kind": "cosine"},
            "attention_bias": False,
            "norm": {"kind": "rms"},
            "modulation": {"kind": "ada_scale"},
            "ffn": {"kind": "geglu", "ratio": 2.0, "bias": False},
            "zero_init_out": True,
        },
        "levels": [
            {
                "d_model": 32,
                "encoder": 1,
                "decoder": 1,
                "attention": {"kind": "neighborhood", "kernel_size": 3},
                "down": {"kind": "merge", "factor": 2},
                "skip": {"kind": "lerp"},
            },
            {"d_model": 64, "middle": 1, "attention": {"kind": "global"}},
        ],
        "head": {
            "kind": "linear",
            "norm": {"kind": "rms", "affine": True},
            "bias": False,
            "learned_sigma": learned_sigma,
        },
        "init": {"linear": "torch_default", "embedding_std": 1.0},
    }


OBJECTIVES = {
    "edm": ({"kind": "edm", "weighting": "soft_min_snr", "gamma": 4.0}, "fourier", False),
    "edm_cosine": (
        {"kind": "edm", "weighting": "karras", "sigma_sampling": {"kind": "cosine_interpolated"}},
        "fourier",
        False,
    ),
    "ddpm_eps": ({"kind": "ddpm_eps"}, "sinusoidal", True),
    "x0": ({"kind": "x0", "lambda_var": 0.05}, "fourier", False),
    "flow": ({"kind": "flow"}, "fourier", False),
    "v": ({"kind": "v"}, "sinusoidal", False),
}


def tiny_experiment_data(objective: str = "edm", steps: int = 20, **sections) -> dict:
    obj, noise, learned = OBJECTIVES[objective]
    data = {
        "name": f"test-{objective}",
        "model": tiny_model(noise, learned),
        "objective": obj,
        "data": {"kind": "digits"},
        "training": {"steps": steps, "batch_size": 16, "seed": 0},
        "optimizer": {"lr": 2e-3, "schedule": {"kind": "constant", "warmup_steps": 2}},
        "ema": {"decay": 0.9},
        "precision": {"attention_backend": "masked"},
        "checkpoint": {"every": 1000, "keep_last": 2},
        "logging": {"every": 1, "tensorboard": False},
        "preview": {"every": 0, "count": 10, "steps": 3},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def tiny_experiment(objective: str = "edm", steps: int = 20, **sections):
    return experiment_from_data(tiny_experiment_data(objective, steps, **sections))


@pytest.fixture
def tiny():
    return tiny_experiment


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine the threads'
    spin-waiting makes them several times slower: the training tests use one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
