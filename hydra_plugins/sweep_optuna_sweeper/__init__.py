"""sweep's Optuna sweeper for Hydra (hydra_plugins/ itself stays a namespace package, without __init__.py)."""
