"""How the command lines (``train.py``, ``evaluate.py``, ``python -m lbdpo.*``) end on an error.

An error lbdpo raised on purpose — a :class:`lbdpo.errors.LbdpoError`: a bad option, file, row, path or launch, its
message naming it and what to do — ends in that one line (``error: …``, exit code 2) instead of a traceback. Every
other exception, whatever its type (a ``ValueError`` from a tuple unpacking, a shape ``RuntimeError`` from a torch
op called by lbdpo code), is a bug or an unforeseen input: it keeps its full traceback and its own exit code.
``HYDRA_FULL_ERROR=1`` shows the traceback of every error.

Before Hydra runs, :func:`check_overrides` turns the command-line override mistakes Hydra would report in several
lines with exit code 1 into the same one line and exit code 2: a key that is not in the config (``trainer.max_step=3``:
it names the closest valid keys), a config group option that does not exist (``model=tiny_randm``), an override Hydra
cannot parse (an unquoted non-ASCII path: it says how to quote).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import Interrupted, LbdpoError


@contextlib.contextmanager
def one_line_errors():
    """Turn an :class:`LbdpoError` into ``error: <message>`` on stderr and exit code 2 (see the module doc), and an
    :class:`Interrupted` (a signal stopped the command) into its message and exit code 128 + the signal."""
    try:
        yield
    except LbdpoError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Interrupted as stop:  # Ctrl-C / SIGTERM: one line saying what was kept, exit code 128 + the signal
        print(str(stop), file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code) from None


QUOTING = ("quote the value for Hydra inside quotes for the shell, e.g. 'data.path=\"数据/偏好.jsonl\"' (an unquoted "
           "value takes ASCII letters, digits and _-/.+@ only; docs/faults.md, Quoting Hydra overrides)")


def check_overrides(argv: list[str], config_dir: str | Path, config_name: str) -> None:
    """Exit 2 with ``error: <one line>`` when ``argv``'s overrides name a key or config that does not exist, or cannot
    be parsed (see the module doc); return when they compose. Hydra's own flags (``--help``, ``--info``, another
    ``--config-dir``), ``HYDRA_FULL_ERROR=1`` and any other composition failure are left to Hydra."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    try:
        message = override_problem(argv, Path(config_dir), config_name)
    except Exception:  # noqa: BLE001 — the check only adds a clearer message; Hydra reports whatever it cannot judge
        return
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def _composable(overrides: list[Any]) -> Iterator[tuple[str, tuple[str, str]]]:
    """(key, (override line to compose, line as typed)) of each override: hydra's own keys dropped, a sweep composed
    with its first value."""
    for o in overrides:
        key = o.get_key_element()
        if key.lstrip("+~").startswith("hydra"):
            continue
        if o.is_sweep_override():
            try:
                yield key.lstrip("+~"), (f"{key}={next(iter(o.sweep_string_iterator()))}", o.input_line)
            except Exception:  # noqa: BLE001 — interval/glob sweeps cannot be listed without a run; Hydra checks them
                continue
        else:
            yield key.lstrip("+~"), (o.input_line, o.input_line)


def flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (as a plain container), parents included: ``trainer``, ``trainer.max_steps``…"""
    if not isinstance(node, dict):
        return []
    keys = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        keys += [full, *flat_keys(value, f"{full}.")]
    return keys


def override_problem(argv: list[str], config_dir: Path, config_name: str) -> str | None:
    """The one-line message for ``argv``'s override mistakes, or None when there is none this check can name."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf import OmegaConf

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # a usage error: Hydra prints its own
        return None
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path or args.config_dir \
            or args.experimental_rerun:
        return None
    parser = OverridesParser.create()
    for line in args.overrides:
        try:
            parser.parse_overrides([line])
        except OverrideParseException as err:
            return f"cannot parse the override {line!r} ({str(err).splitlines()[0]}); {QUOTING}"
    lines = dict(_composable(parser.parse_overrides(args.overrides)))  # key -> lines (the last one wins, as in Hydra)
    unknown: dict[str, str] = {}
    for _ in range(len(lines) + 1):
        try:
            with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
                cfg = compose(args.config_name or config_name, [line for line, _ in lines.values()])
            break
        except MissingConfigException as err:  # a config group option that does not exist
            group, _, option = str(err.missing_cfg_file or "").rpartition("/")
            if not group:
                return None
            options = list(err.options or re.findall(r"^\t(\S+)$", str(err), flags=re.M))
            close = difflib.get_close_matches(option, options, n=3)
            return (f"{group}={option}: config group {group!r} has no option {option!r}; closest: "
                    f"{', '.join(close) or 'none'} (all: {', '.join(options) or 'none'})")
        except ConfigCompositionException as err:
            bad = re.match(r"Could not override '([^']+)'", str(err))
            if not bad or bad.group(1) not in lines:
                return None
            unknown[bad.group(1)] = lines.pop(bad.group(1))[1]
    if not unknown:
        return None
    keys = flat_keys(OmegaConf.to_container(cfg, resolve=False))
    named = [f"{key} (closest valid: {', '.join(difflib.get_close_matches(key, keys, n=3, cutoff=0.6)) or 'none'})"
             for key in unknown]
    return (f"no such config key: {'; '.join(named)}; fix the spelling, or add a new key on purpose with "
            f"+{next(iter(unknown.values()))}")
