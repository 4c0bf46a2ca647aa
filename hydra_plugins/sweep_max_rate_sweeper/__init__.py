"""`hydra/sweeper=max_rate`: the highest request rate an engine sustains under an SLO, by bisection."""
