"""NPU quantization from the golden run's dumps: calibration data, static QDQ graphs, mixed precision."""
