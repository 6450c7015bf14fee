"""Benchmarks (not installed with the package): python -m benchmarks.bench."""
