"""Plugin: the `onnx` exporter (work in progress)."""
