"""The demo model: a checkpoint written with numpy alone (python -m pipeline.demo)."""
