"""``ditkit.runtime``: inference — objectives' denoisers, samplers, checkpoints, conversion,
resolution extrapolation policies, autoencoders and image files."""
