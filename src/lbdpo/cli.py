"""How the command lines (``train.py``, ``evaluate.py``, ``python -m lbdpo.*``) end on an error.

An error lbdpo raised on purpose — a :class:`lbdpo.errors.LbdpoError`: a bad option, file, row, path or launch, its
message naming it and what to do — ends in that one line (``error: …``, exit code 2) instead of a traceback. Every
other exception, whatever its type (a ``ValueError`` from a tuple unpacking, a shape ``RuntimeError`` from a torch
op called by lbdpo code), is a bug or an unforeseen input: it keeps its full traceback and its own exit code.
``HYDRA_FULL_ERROR=1`` shows the traceback of every error.
"""

from __future__ import annotations

import contextlib
import os
import sys

from .errors import LbdpoError


@contextlib.contextmanager
def one_line_errors():
    """Turn an :class:`LbdpoError` into ``error: <message>`` on stderr and exit code 2 (see the module doc)."""
    try:
        yield
    except LbdpoError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
