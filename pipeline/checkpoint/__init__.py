"""Reading HuggingFace checkpoints without torch: config.json and safetensors weights."""
