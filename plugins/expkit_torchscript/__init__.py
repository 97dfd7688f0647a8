"""Plugin: the `torchscript` exporter (work in progress)."""
