"""compiled: a gpt-fast-style engine on transformers' model code.

patches.py  what it changes inside transformers' model: decode attention over the static cache, fused projections
engine.py   the static-cache engine loop: state at fixed addresses, prefill, decode step, compile, CUDA graphs
inflight.py batching in flight over the same cache: rows as slots, chunked prefill, decode per batch size
backend.py  the Backend: checks, build (the compile cache is the artifact), load, serve
config.py   its settings: backend.scheduler (inflight or static); its build options are engine.*
"""
