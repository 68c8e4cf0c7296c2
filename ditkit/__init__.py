"""ditkit: config-as-code builder for hierarchical diffusion transformers."""

__version__ = "0.1.0"
