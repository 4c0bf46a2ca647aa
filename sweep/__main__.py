"""`sweep` and `python -m sweep`: the Hydra entry point. Safe to import (engine workers may re-import it)."""

import logging
import signal
import sys

import hydra
from omegaconf import DictConfig

from sweep.config import CONF_DIR
from sweep.job.compose import register_configs, unknown_key
from trackers.store import redact

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from sweep.job.execute import main as run_main

    return run_main(cfg)


def terminate(signum: int, frame: object) -> None:
    """SIGTERM (timeout, Docker, SLURM, Kubernetes) ends the process the way Ctrl-C does: the run KILLED with
    the reason, temporary build directories removed."""
    raise KeyboardInterrupt(f"terminated by {signal.Signals(signum).name}")


def redact_log_records() -> None:
    """No log line, ours, Hydra's or a library's, carries a password from a URI. A record factory survives
    Hydra's logging set-up, which replaces every handler."""
    make_record = logging.getLogRecordFactory()

    def redacted_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = redact(message), ()
        return record

    logging.setLogRecordFactory(redacted_record)


def cli() -> None:
    """The console script `sweep`, the same as `python -m sweep`."""
    signal.signal(signal.SIGTERM, terminate)
    redact_log_records()
    if message := unknown_key(sys.argv[1:]):  # before Hydra, whose advice for a typo is to add it with `+`
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
