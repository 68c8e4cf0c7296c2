"""The one ``--device`` / ``--threads`` rule (ditkit.device), CUDA branches included:
the decision is a pure function, and ``pick_device`` is fed a monkeypatched ``torch.cuda``."""

import pytest
import torch

from ditkit.errors import UserError
from ditkit import device as D


@pytest.mark.parametrize(
    "text, available, count, rank, expected",
    [
        ("cpu", True, 2, 0, "cpu"),
        ("auto", False, 0, 0, "cpu"),
        (None, False, 0, 0, "cpu"),
        ("auto", True, 2, 0, "cuda:0"),
        ("auto", True, 2, 1, "cuda:1"),  # torchrun: the local rank picks its GPU
        ("cuda", True, 1, 0, "cuda:0"),  # the index torch.cuda.set_device needs
        ("cuda", True, 4, 3, "cuda:3"),
        ("cuda:1", True, 2, 0, "cuda:1"),  # an explicit index wins over the rank
        ("CUDA:0", True, 2, 1, "cuda:0"),
    ],
)
def test_resolve_device(text, available, count, rank, expected):
    assert (
        D.resolve_device(text, cuda_available=available, device_count=count, rank=rank) == expected
    )


@pytest.mark.parametrize(
    "text, available, count, rank, message",
    [
        ("cuda", False, 0, 0, "no CUDA device is available"),
        ("cuda:0", False, 0, 0, "no CUDA device is available"),
        ("cuda:2", True, 2, 0, "index 2 but only 2 CUDA device(s)"),
        ("cuda", True, 2, 2, "local rank 2 but only 2 CUDA device(s)"),
        ("gpu", True, 1, 0, "use cpu, cuda, cuda:N or auto"),
        ("cuda:x", True, 1, 0, "use cpu, cuda, cuda:N or auto"),
    ],
)
def test_resolve_device_errors_are_user_errors(text, available, count, rank, message):
    with pytest.raises(D.DeviceError) as info:
        D.resolve_device(text, cuda_available=available, device_count=count, rank=rank)
    assert isinstance(info.value, UserError) and message in str(info.value)
    assert str(info.value).startswith(f"--device {text}") or "--device '" in str(info.value)


def test_pick_device_reads_torch_cuda_and_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert D.pick_device("cuda") == torch.device("cuda", 2)
    assert D.pick_device("auto") == torch.device("cuda", 2)
    assert D.pick_device("cuda:0") == torch.device("cuda", 0)
    assert D.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert D.pick_device("auto") == torch.device("cpu")
    with pytest.raises(D.DeviceError, match="no CUDA device"):
        D.pick_device("cuda")


def test_default_threads_rule():
    assert D.default_threads({}, cpus=2) == 1  # a small shared machine: one thread
    assert D.default_threads({}, cpus=1) == 1
    assert D.default_threads({}, cpus=16) == 8
    assert D.default_threads({}, cpus=64) == D.MAX_DEFAULT_THREADS
    assert D.default_threads({"LOCAL_WORLD_SIZE": "4"}, cpus=16) == 2  # shared by 4 ranks
    assert D.default_threads({"OMP_NUM_THREADS": "3"}, cpus=2) == 3  # the user's choice
    assert D.default_threads({"OMP_NUM_THREADS": "junk"}, cpus=8) == 4


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert D.set_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert D.set_threads(None) == 1 and torch.get_num_threads() == 1
        with pytest.raises(UserError, match="--threads 0"):
            D.set_threads(0)
    finally:
        torch.set_num_threads(before)


# ---- the samplers and the training loop take their device from the same rule


def _cuda(monkeypatch, count: int, local_rank: str | None = None):
    monkeypatch.setattr("torch.cuda.is_available", lambda: count > 0)
    monkeypatch.setattr("torch.cuda.device_count", lambda: count)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)


def test_sampler_device_cuda_is_the_local_rank_gpu(monkeypatch):
    from ditkit.runtime.samplers import check_device

    _cuda(monkeypatch, 2, "1")
    assert check_device("cuda") == torch.device("cuda", 1)
    assert check_device("auto") == torch.device("cuda", 1)
    assert check_device("cuda:0") == torch.device("cuda", 0)
    assert check_device(torch.device("cpu")) == torch.device("cpu")


def test_sampler_device_without_cuda_is_a_sampling_error(monkeypatch):
    from ditkit.runtime.samplers import SamplingError, check_device

    _cuda(monkeypatch, 0)
    assert check_device("auto") == torch.device("cpu")
    with pytest.raises(SamplingError, match="--device cuda: no CUDA device"):
        check_device("cuda")


@pytest.mark.parametrize("device,backend", [("cpu", "gloo"), ("cuda:1", "nccl")])
def test_torchrun_backend_follows_the_training_device(monkeypatch, device, backend):
    import torch.distributed as dist

    from ditkit.spec.experiment import Experiment
    from ditkit.training.loop import init_distributed

    _cuda(monkeypatch, 2)  # a GPU machine: a --device cpu run must still use gloo
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda b: calls.append(b))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    info = init_distributed(Experiment(model="tiny-dit"), torch.device(device))
    assert calls == [backend] and (info.rank, info.world, info.local_rank) == (1, 2, 1)
