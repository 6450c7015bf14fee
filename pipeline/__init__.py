"""stagepipe: run Qwen models as split static-shape ONNX stages that talk through files."""

__version__ = "0.1.0"
