"""Loaders: GGUF files, HF checkpoint directories (config.json + safetensors), tokenizers."""
