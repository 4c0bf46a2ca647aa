"""The model layer: where a checkpoint comes from and what its shape costs in bytes."""
