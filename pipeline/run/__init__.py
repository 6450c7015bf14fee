"""Orchestrating runs: run_auto's doit tasks, run-folder locking, finding or converting the model."""
