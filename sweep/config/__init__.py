"""The config layer: the schema Hydra checks every value against, the config files, and the one error type."""

from pathlib import Path

# conf/ at the top of the repository; sweep/conf links to it, so that a wheel carries the files inside the package.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
