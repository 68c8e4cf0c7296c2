"""One rule for ``--device`` and ``--threads`` in every command.

Device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the default everywhere).

- ``auto``: ``cuda`` when CUDA is available, else ``cpu``;
- ``cuda``: ``cuda:L``; torch calls such as ``torch.cuda.set_device`` need an index, so it is
  always filled in;
- ``cuda:N``: that GPU, checked against the number of GPUs;

where ``L`` is the local rank under ``torchrun`` (``LOCAL_RANK``), else 0: each process of a
multi-GPU run picks its own GPU. Asking for CUDA where there is none is a :class:`DeviceError`
(a :class:`~ditkit.errors.UserError`: exit 2, one line).

:func:`resolve_device` is the decision, a pure function of its arguments (tested without a
GPU); :func:`pick_device` feeds it what ``torch.cuda`` reports.

Threads: :func:`default_threads` is ``OMP_NUM_THREADS`` when set, else half the CPUs this
process may run on, divided among the local ``torchrun`` processes, between 1 and 8. Small
models gain little from more threads, and on a shared machine threads that spin waiting for a
busy core make a step many times slower (``train`` on a 2-core machine in use by others: 2.5
img/s with torch's default threads, about 100 img/s with one).
"""

from __future__ import annotations

import ctypes
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ditkit.errors import UserError

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"
MAX_DEFAULT_THREADS = 8


class DeviceError(UserError):
    """A ``--device`` that names no usable device."""


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 matrix or vector units (``amx_bf16`` or ``avx512_bf16`` in
    ``/proc/cpuinfo``): where it has none, bf16 autocast runs in emulation, slower than fp32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read(1 << 20)
        except OSError:
            return False
    flags = set(re.findall(r"\b(amx_bf16|avx512_bf16)\b", cpuinfo))
    return bool(flags)


def local_rank(environ=None) -> int:
    """The process's local rank under ``torchrun`` (``LOCAL_RANK``), else 0."""
    env = os.environ if environ is None else environ
    try:
        return max(0, int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        return 0


def resolve_device(
    text: str | None,
    *,
    cuda_available: bool,
    device_count: int,
    rank: int = 0,
    flag: str = "--device",
) -> str:
    """The device string ``text`` means, index filled in: ``"cpu"`` or ``"cuda:N"``."""
    value = (text or "auto").strip().lower()
    if value == "cpu":
        return "cpu"
    if value == "auto":
        if not cuda_available or device_count == 0:
            return "cpu"
        value = "cuda"
    m = re.fullmatch(r"cuda(?::(\d+))?", value)
    if m is None:
        raise DeviceError(f"{flag} {text!r}: use {DEVICE_CHOICES}")
    if not cuda_available or device_count == 0:
        raise DeviceError(
            f"{flag} {text}: no CUDA device is available here (this torch build "
            "or machine has none); use --device cpu or --device auto"
        )
    index = int(m.group(1)) if m.group(1) is not None else rank
    if index >= device_count:
        what = "local rank" if m.group(1) is None else "index"
        raise DeviceError(
            f"{flag} {text}: {what} {index} but only {device_count} CUDA "
            f"device(s) (cuda:0..cuda:{device_count - 1})"
        )
    return f"cuda:{index}"


def pick_device(text: str | None = "auto", flag: str = "--device") -> torch.device:
    """``torch.device`` for ``text`` on this machine (see :func:`resolve_device`)."""
    import torch

    available = bool(torch.cuda.is_available())
    count = torch.cuda.device_count() if available else 0
    return torch.device(
        resolve_device(
            text, cuda_available=available, device_count=count, rank=local_rank(), flag=flag
        )
    )


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(environ=None, cpus: int | None = None) -> int:
    """The thread count a command uses when ``--threads`` is not given (module docstring)."""
    env = os.environ if environ is None else environ
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    try:
        local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    cpus = cpu_count() if cpus is None else cpus
    return max(1, min(MAX_DEFAULT_THREADS, cpus // (2 * local)))


def set_threads(threads: int | None, flag: str = "--threads") -> int:
    """Set torch's intra-op threads to ``threads`` (default: :func:`default_threads`) and
    return the number set."""
    import torch

    if threads is not None and threads < 1:
        raise UserError(f"{flag} {threads}: must be 1 or more")
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


#: ``DITKIT_CPU_ALLOCATOR=default`` leaves glibc's allocator settings alone
ALLOCATOR_ENV = "DITKIT_CPU_ALLOCATOR"
#: glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_THRESHOLD = 32 << 20
_allocator_tuned: bool | None = None


def tune_cpu_allocator(environ=None) -> bool:
    """Keep freed tensor buffers up to 32 MiB in glibc's heap instead of giving them back to
    the system (``mallopt``: mmap threshold 32 MiB, trim threshold 1 GiB). Returns whether the
    settings are in force. Once per process; ``DITKIT_CPU_ALLOCATOR=default`` turns it off.

    Why: by default glibc serves every buffer over its (adaptive) mmap threshold with a fresh
    ``mmap`` and unmaps it on free, so each new activation of a few MiB page-faults on first
    touch, which the kernel pays for by zeroing the pages. On this project's 2-core VM a GEGLU
    product (``value * gelu(gate)``, 1x64x64x384) took 10 ms that way against 2.1-3.5 ms with
    the buffers reused, and the hdit-bench-4m forward at 256^2 / 512^2 ran 13-15 % faster
    (docs/measurements.md). The cost: the process keeps its peak heap resident, as PyTorch's
    own caching allocators do on GPUs. Not glibc (macOS, musl, Windows): nothing to do."""
    global _allocator_tuned
    env = os.environ if environ is None else environ
    if env.get(ALLOCATOR_ENV, "").strip().lower() == "default":
        return False
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        _allocator_tuned = bool(
            libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
            and libc.mallopt(m_trim_threshold, 1 << 30)
        )
    except (OSError, AttributeError):  # no glibc
        pass
    return _allocator_tuned
