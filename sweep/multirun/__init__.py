"""Multiruns: the parent run of a grid or search, and the one door sweeper plugins use (sweeper_api)."""
