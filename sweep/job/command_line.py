"""What a command line may say, and Hydra's refusals of it as one line: a key the config lacks, a value of the wrong
type, a config group option that does not exist, sweep syntax that cannot be parsed.

Hydra prints these as a page (exit 1) and advises adding a mistyped key with `+`; sweep says which key, which value
and what is allowed, and exits 2 (sweep/__main__.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Iterable

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import ValidationError

from sweep.backends.registry import BACKENDS
from sweep.config.schema import SweepConfig
from sweep.job.compose import GROUPS

# The schema's sections: a key inside one must be a field of it, even added with `+` (a free top-level `+key`, a
# note of the user's, stays allowed). tracker.tags is a dict: any name in it is a tag.
SECTIONS = ("model", "backend", "engine", "workload", "slo", "tracker", "objective")
FREE_KEYS = ("tracker.tags.",)
SWEEP_SYNTAX = "one value, or a sweep: a,b,c, choice(a,b,c), range(start,stop,step) or interval(low,high)"
# OmegaConf's node types and the words of its conversion errors -> what such a key takes
TYPE_NAMES = {
    "IntegerNode": "an integer",
    "Integer": "an integer",
    "FloatNode": "a number",
    "Float": "a number",
    "BooleanNode": "true or false",
    "StringNode": "a string",
}


def known_keys() -> set[str]:
    """Every key a command line may set without `+`: the schema's fields, every backend's, the groups."""
    keys = set(GROUPS)
    for name, schema in typing.get_type_hints(SweepConfig).items():
        keys.add(name)
        if dataclasses.is_dataclass(schema):  # a section: model, engine, workload, slo, tracker, objective
            keys |= {f"{name}.{f.name}" for f in dataclasses.fields(schema)}
    for spec in BACKENDS.values():
        keys |= {f"backend.{f.name}" for f in dataclasses.fields(spec.config_class)}
    return keys


def unknown_key(args: Iterable[str]) -> str | None:
    """One line for the first `key=value` whose key the config does not have, with the nearest known keys.

    Hydra's own error would advise `+key=value`, which adds the typo as a new key instead of fixing it; and a key
    added with `+` inside a section of the schema (`+engine.foo=1`) is a setting no backend reads."""
    keys = known_keys()
    for arg in args:
        key = arg.split("=", 1)[0]
        added = key.startswith("+")
        key = key.lstrip("+")
        if arg.startswith("-") or "=" not in arg or key.startswith(("~", "hydra")) or "/" in key or "@" in key:
            continue
        if key in keys or key.startswith(FREE_KEYS) or (added and key.split(".", 1)[0] not in SECTIONS):
            continue
        close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "no key is close to it;"
        return f"{key} is not a key of the config: {hint} (`python -m sweep --help` lists the keys)"
    return None


def sweep_value_refusal(args: list[str]) -> str | None:
    """One line for the first value of a multirun's sweep that Hydra cannot compose (a wrong type, a missing group
    option), with the command line's other settings: Hydra composes each job only as it launches it, after the
    jobs before it ran and recorded. None when every value composes (or this is no multirun)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    from sweep.job.compose import compose

    parsed = get_args_parser().parse_args(args)
    if not parsed.multirun or parsed.config_dir or parsed.config_name or parsed.config_path:
        return None  # another config tree than sweep's own: Hydra judges it as it launches the jobs
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except OverrideParseException:
        return None  # Hydra refuses it in a moment, as one line (hydra_error_message)
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    for override in overrides:
        if not override.is_discrete_sweep() or override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            continue  # a single value, an interval (a search samples it), or a glob over the group's options
        if override.is_hydra_override():
            continue
        values = list(override.sweep_string_iterator())
        for value in values[:1] if override.is_range_sweep() else values:  # a range's values share one type
            try:
                compose([*fixed, f"{override.get_key_element()}={value}"])
            except Exception as exc:
                return hydra_error_message(exc)
    return None


def hydra_error_message(exc: BaseException) -> str | None:
    """One line for an error of Hydra's composing the config from the command line; None for any other error."""
    if isinstance(exc, OverrideParseException):
        key, _, value = exc.override.partition("=")
        # Hydra names why an override that parses fails to evaluate (`choice()`: "empty choice is not legal")
        evaluated = [line.split("': ", 1)[1] for line in str(exc).splitlines() if " while evaluating '" in line]
        why = f": {evaluated[0]}" if evaluated else ""
        return f"{key}={value!r} cannot be parsed{why}; write {SWEEP_SYNTAX} (quote it in the shell)"
    if isinstance(exc, MissingConfigException):
        return missing_option_message(exc)
    if isinstance(exc, ConfigCompositionException):
        if isinstance(exc.__cause__, ValidationError):
            return wrong_type_message(exc.__cause__)
        reason = f": {first_line(exc.__cause__)}" if exc.__cause__ is not None else ""
        return f"{first_line(exc)}{reason}"
    return None


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def missing_option_message(exc: MissingConfigException) -> str:
    """`workload=thruput is not allowed; choose one of: ...; did you mean throughput?`"""
    if not exc.options or not exc.missing_cfg_file or "/" not in exc.missing_cfg_file:
        return first_line(exc)
    group, option = exc.missing_cfg_file.rsplit("/", 1)
    options = sorted(o for o in exc.options if not o.endswith("_schema"))  # the backends' schemas are internal
    close = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{group}={option!r} is not allowed; choose one of: {', '.join(options)}{hint}"


def wrong_type_message(error: ValidationError) -> str:
    """`engine.max_batch_size='abc' is not allowed; it must be an integer`"""
    value = "null" if error.value is None else repr(error.value) if isinstance(error.value, str) else error.value
    node = type(error.child_node).__name__ if error.child_node is not None else ""
    words = str(error.msg).split("\n", 1)[0]
    wanted = TYPE_NAMES.get(node) or next((t for w, t in TYPE_NAMES.items() if words.endswith(f" {w}")), None)
    if "is not Optional" in words:
        return f"{error.full_key}=null is not allowed; it must be {wanted or 'set'} (this key cannot be null)"
    return f"{error.full_key}={value} is not allowed; it must be {wanted or 'of the schema type: ' + words}"
