"""Is a saved file whole? Cheap structural checks of the files a checkpoint folder holds, and one-line errors for a
file that cannot be read.

Checkpoints are written atomically (:mod:`lbdpo.train.checkpoint`), so a kill never leaves a half-written one under
a real name; a file can still be damaged later (a copy or download cut short, a disk error, a hand edit). The checks
read headers and sizes only, never the tensors, so a folder of any size is checked in milliseconds:

    *.safetensors   the 8-byte header length, the JSON header, and the file's size = 8 + header + the end of its
                    last tensor (a truncated file is shorter)
    *.pt            a torch zip archive: its central directory (stored at the end: a truncated file has none) and
                    every entry's data inside the file
    *.json, *.yaml  they parse

What they cannot see — flipped bits inside tensor data — is caught only if the loader fails on it; such a failure
is reported the same way (:func:`damaged`).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

from .errors import DamagedCheckpointError, LbdpoError

MAX_HEADER = 100_000_000  # safetensors' own limit on its JSON header (bytes)
ZIP_LOCAL_HEADER = 30  # bytes of a zip local file header before the name and extra field


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a ``.safetensors`` file's structure, or None when it is whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, not even the 8-byte header length"
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            return f"truncated or not a safetensors file: a {n}-byte header in a {size}-byte file"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"its header is not valid JSON ({err})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{'truncated' if size < expected else 'trailing bytes'}: {size} bytes, its header describes {expected}"
    return None


def torch_zip_problem(path: Path) -> str | None:
    """What is wrong with a ``torch.save`` file's zip structure, or None when it is whole."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                end = info.header_offset + ZIP_LOCAL_HEADER + len(info.filename.encode()) + info.compress_size
                if end > size:
                    return f"truncated: {info.filename} ends past the file's {size} bytes"
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"truncated or not a torch archive: {err}"
    return None


RUN_CONFIG_KEYS = ("model", "beta_head", "data", "trainer", "seed")  # a checkpoint's config.yaml; seed comes last


def text_problem(path: Path) -> str | None:
    """A JSON or YAML file that does not parse: why; None when it parses. A checkpoint's ``config.yaml`` (YAML cut
    at a line end still parses) must also hold every section of a training config and end with its integer ``seed``."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            json.loads(text)
            return None
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.create(text))
    except Exception as err:  # UnicodeDecodeError, JSONDecodeError, yaml's ScannerError/ParserError, …
        return f"does not parse: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    if path.name == "config.yaml":
        missing = [k for k in RUN_CONFIG_KEYS if not isinstance(config, dict) or config.get(k) is None]
        if missing or not isinstance(config["seed"], int):
            return f"cut short: a training config without {missing or ['an integer seed']}"
    return None


CHECKS: dict[str, Callable[[Path], str | None]] = {
    ".safetensors": safetensors_problem, ".pt": torch_zip_problem, ".json": text_problem, ".yaml": text_problem}


def damaged_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[Path, str]:
    """Every file directly in ``folder`` whose kind is checked (``*.safetensors``, ``*.pt``, ``*.json``,
    ``*.yaml``), except the names in ``skip``, that is not whole: path → what is wrong. Empty when all are whole
    (missing files are not looked for: that is the caller's check)."""
    found = {}
    for path in sorted(Path(folder).iterdir()):
        check = CHECKS.get(path.suffix)
        if check is not None and path.name not in skip and path.is_file():
            problem = "empty (0 bytes)" if path.stat().st_size == 0 else check(path)
            if problem:
                found[path] = problem
    return found


def describe(problems: dict[Path, str]) -> str:
    """``<file> is damaged (<why>)`` for the first damaged file, and how many others are."""
    path, why = next(iter(problems.items()))
    more = f" (and {len(problems) - 1} other file(s) of {path.parent.name})" if len(problems) > 1 else ""
    return f"{path} is damaged ({why}){more}"


def check_intact(folder: Path, what_to_do: str, skip: tuple[str, ...] = ()) -> None:
    """Raise :class:`DamagedCheckpointError` ``<file> is damaged (<why>); <what_to_do>`` when a file of ``folder``
    (but those named in ``skip``) is not whole (:func:`damaged_files`)."""
    problems = damaged_files(folder, skip)
    if problems:
        raise DamagedCheckpointError(f"{describe(problems)}; {what_to_do}")


def damaged(path: Path, err: BaseException, what_to_do: str) -> DamagedCheckpointError:
    """The one-line error for a file whose loader failed: ``<file> is damaged (cannot be read: <first line>)``."""
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return DamagedCheckpointError(f"{path} is damaged (cannot be read: {type(err).__name__}: {first}); {what_to_do}")


def read_checked(path: Path, loader: Callable[[Path], Any], what_to_do: str) -> Any:
    """``loader(path)``; any failure to read (a torch, safetensors, zip or OS error) becomes :func:`damaged`. An
    lbdpo error or running out of memory passes unchanged."""
    try:
        return loader(path)
    except (LbdpoError, MemoryError):
        raise
    except Exception as err:
        raise damaged(path, err, what_to_do) from err
