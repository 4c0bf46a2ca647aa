"""One run, the unit Hydra launches: compose and validate the config, plan, build or reuse, benchmark, record."""
