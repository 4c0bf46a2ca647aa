"""Comparison reports of recorded runs: `python -m sweep.report`."""
