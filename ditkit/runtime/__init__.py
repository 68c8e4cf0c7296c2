"""``ditkit.runtime``: denoisers, samplers, checkpoints, conversion, ONNX export, engines,
resolution extrapolation, and the device / thread rule of every command."""
