"""Pydantic models for every JSON file stagepipe writes; JSON Schema exports live beside them."""
