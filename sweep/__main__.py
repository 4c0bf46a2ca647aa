"""`sweep` and `python -m sweep`: the Hydra entry point. Safe to import (engine workers may re-import it)."""

import contextlib
import logging
import os
import signal
import sys
from typing import Iterator

import hydra
from omegaconf import DictConfig

from sweep.config import CONF_DIR
from sweep.job.command_line import hydra_error_message, sweep_value_refusal, unknown_key
from sweep.job.compose import register_configs, render_help
from trackers.store import redact

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from sweep.job.execute import main as run_main

    return run_main(cfg)


def terminate(signum: int, frame: object) -> None:
    """SIGTERM (timeout, Docker, SLURM, Kubernetes) ends the process the way Ctrl-C does: the run KILLED with
    the reason, temporary build directories removed."""
    interrupt = KeyboardInterrupt(f"terminated by {signal.Signals(signum).name}")
    interrupt.signum = signum  # the exit status
    raise interrupt


def interruption_line(exc: KeyboardInterrupt) -> str:
    """One line for Ctrl-C or SIGTERM: what was recorded, what was kept, how to resume (instead of a traceback)."""
    from sweep.multirun.callback import end_interrupted

    reason = str(exc) or "interrupted (Ctrl-C)"
    if line := end_interrupted(reason):
        return line
    kept = [*getattr(exc, "__notes__", []), "every engine built before it stays in the engine cache"]
    return f"{reason}: {'; '.join(kept)}; resume: run the same command again"


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


# Hydra prints an error itself and exits 1, unless this is "1": then the error reaches the caller.
HYDRA_FULL_ERROR_ENV = "HYDRA_FULL_ERROR"


@contextlib.contextmanager
def hydra_errors_raised() -> Iterator[None]:
    """Hydra's errors reach the block's caller while it runs; the user's own HYDRA_FULL_ERROR after it."""
    users = os.environ.get(HYDRA_FULL_ERROR_ENV)
    os.environ[HYDRA_FULL_ERROR_ENV] = "1"
    try:
        yield
    finally:
        if users is None:
            os.environ.pop(HYDRA_FULL_ERROR_ENV, None)
        else:
            os.environ[HYDRA_FULL_ERROR_ENV] = users


def refuse(message: str) -> None:
    print(f"error: {redact(message)}", file=sys.stderr)
    sys.exit(2)


def print_help(argv: list[str]) -> bool:
    """`--help` (with any overrides): print it and say so; False for every other command line, Hydra's to run."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if not args.help or args.hydra_help or args.config_dir or args.config_path or args.config_name:
        return False
    try:
        print(render_help(args.overrides, resolve=args.resolve))
    except Exception as exc:  # an override that does not compose: one line, as a run would say it
        print(f"error: {hydra_error_message(exc) or ' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
    return True


def cli() -> None:
    """The console script `sweep`, the same as `python -m sweep`. A setting Hydra cannot compose is one line and
    exit 2, before anything runs; any other error shows as Hydra shows it."""
    signal.signal(signal.SIGTERM, terminate)
    redact_log_records()
    # before Hydra, whose advice for a typo is to add it with `+`, and which composes a sweep's jobs one by one
    if message := unknown_key(sys.argv[1:]) or sweep_value_refusal(sys.argv[1:]):
        refuse(message)
    if print_help(sys.argv[1:]):
        return
    try:
        with hydra_errors_raised():
            main()
    except KeyboardInterrupt as exc:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the records short
        print(redact(interruption_line(exc)), file=sys.stderr)
        sys.exit(128 + getattr(exc, "signum", signal.SIGINT))
    except Exception as exc:
        if message := hydra_error_message(exc):
            refuse(message)
        show_as_hydra_does(exc)


def show_as_hydra_does(exc: Exception) -> None:
    """Hydra's report of an error: from the job's frames on (or all of it, with HYDRA_FULL_ERROR=1), exit 1."""
    from hydra._internal.utils import run_and_report

    frames = exc.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_name != "run_job":  # Hydra looks for it among the top
        frames = frames.tb_next
    exc = exc.with_traceback(frames or exc.__traceback__)

    def reraise() -> None:
        raise exc

    run_and_report(reraise)


if __name__ == "__main__":
    cli()
