"""hf: eager transformers `generate`, the original scripts' PyTorch baseline (config.py: settings; backend.py: the Backend)."""
