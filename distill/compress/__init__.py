"""Compression and deployment: export (ONNX, TorchScript, safetensors)."""
