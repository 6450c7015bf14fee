"""The converter: a checkpoint -> an onnx_dir of static-shape embed/block/output graphs (python -m pipeline.convert)."""
