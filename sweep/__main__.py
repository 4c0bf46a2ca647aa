"""`python -m sweep`: the Hydra entry point. Safe to import (engine workers may re-import it)."""

import sys

import hydra
from omegaconf import DictConfig

from sweep.compose import register_configs, unknown_key

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from sweep.run import main as run_main

    return run_main(cfg)


if __name__ == "__main__":
    if message := unknown_key(sys.argv[1:]):  # before Hydra, whose advice for a typo is to add it with `+`
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    main()
