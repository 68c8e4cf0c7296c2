"""``ditkit.deploy``: export and engines — the ONNX graph and its I/O, onnxruntime (with its
fusions, int8 and the OpenVINO provider), TensorRT, and the sampling benchmark across them."""
