"""hf: eager transformers `generate`, the seed's PyTorch baseline (config.py: settings; backend.py: the Backend)."""
