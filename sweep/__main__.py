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


def unparsable_override(args: list[str]) -> str | None:
    """One line for the first `key=value` Hydra's override grammar cannot parse (`choice()`, an unquoted `<=5`),
    which Hydra reports in several lines and exit code 1."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as exc:
            evaluated = [line.split("': ", 1)[1] for line in str(exc).splitlines() if " while evaluating '" in line]
            why = evaluated[0] if evaluated else "not in Hydra's override grammar"
            return (
                f"{arg} is not allowed: {why}; write key=value, key=a,b or a sweep (choice(a,b), range(1,9), "
                "interval(0,1)), and quote a value holding < = ( or ): key='<=5'"
            )
    return None


def cli() -> None:
    """The console script `sweep`, the same as `python -m sweep`."""
    signal.signal(signal.SIGTERM, terminate)
    redact_log_records()
    # before Hydra, whose advice for a typo is to add it with `+`, and whose parse errors take several lines
    if message := unknown_key(sys.argv[1:]) or unparsable_override(sys.argv[1:]):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
