"""Backends: one package each (config.py: its settings; backend.py: the Backend), registered in registry.py."""
