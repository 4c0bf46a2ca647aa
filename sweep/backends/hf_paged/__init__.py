"""hf_paged: transformers' own continuous batching with a paged KV cache (config.py: settings; backend.py: the
Backend)."""
