"""Running the stages: step planning, backends, the KV cache, sampling, the tokenizer (no doit, no converter)."""
