"""hf: eager transformers `generate`, the original scripts' baseline (config.py: settings; backend.py: the Backend)."""
