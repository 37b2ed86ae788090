"""poprt-lite: compile transformer-encoder ONNX models for padding-free (packed) inference."""

__version__ = "0.1.0"
