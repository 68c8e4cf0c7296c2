"""``ditkit.builder``: spec -> ``nn.Module``, the attention kernels, and model accounting."""

from .accounting import Report, describe, format_report
from .kernels import NEIGHBORHOOD_BACKENDS, natten_available, use_backend
from .model import DiffusionTransformer, build, initialize

__all__ = [
    "build",
    "initialize",
    "DiffusionTransformer",
    "describe",
    "format_report",
    "Report",
    "use_backend",
    "NEIGHBORHOOD_BACKENDS",
    "natten_available",
]
