"""sweep: build (or reuse) an LLM inference engine, benchmark it, and record the run in MLflow."""
