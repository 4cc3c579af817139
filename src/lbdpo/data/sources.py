"""Reading the rows of a preference source: a local file or folder (``.json``/``.jsonl``/``.csv``/``.parquet``)
or a Hugging Face hub dataset. Errors name the file and, for JSON lines, the line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
from ..errors import HubUnreachableError, LbdpoError, MissingFileError

KNOWN_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")


def looks_like_path(source: str) -> bool:
    """True for things meant as local paths. A hub id is ``name`` or ``org/name``, so one slash alone is not
    enough: paths start with / . ~, have two or more slashes, or end with a known extension."""
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") >= 2
        or "\\" in source
        or source.lower().endswith(KNOWN_EXTENSIONS)
    )


def local_files(path: Path) -> list[Path]:
    """The data files of a file or folder (a folder's files with known extensions, sorted by name)."""
    if path.is_file():
        if path.suffix.lower() not in KNOWN_EXTENSIONS:
            raise LbdpoError(f"{path}: unsupported file type; expected one of {', '.join(KNOWN_EXTENSIONS)}")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in KNOWN_EXTENSIONS)
    if not files:
        raise MissingFileError(f"{path}: folder has no {'/'.join(KNOWN_EXTENSIONS)} files")
    return files


def _read_json_lines(path: Path, text: str) -> Iterator[Any]:
    """Parses JSON-lines text, naming the file and 1-based line number of a malformed line."""
    # split on "\n" only: str.splitlines() would also cut at U+2028 etc., which JSON strings may hold raw
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            raise LbdpoError(f"{path}:{lineno}: malformed JSON line ({err.msg}, column {err.colno})") from None


def _read_json(path: Path) -> list[Any]:
    """Rows of a ``.json``/``.jsonl`` file: one JSON list, or JSON lines (whatever the extension)."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return list(_read_json_lines(path, text))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise LbdpoError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    return rows


def read_local(path: Path, text_columns: Iterable[str]) -> list[Any]:
    """Rows of one local file; ``.csv``/``.parquet`` are read by ``datasets``. The CSV ``text_columns`` stay
    strings (no number parsing, no NaN for empty cells)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".json", ".jsonl"):
            return _read_json(path)
        if suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path)).to_list()
        as_text = dict.fromkeys(text_columns, str)  # pandas ignores the names this file does not have
        return datasets.Dataset.from_csv(str(path), keep_default_na=False, converters=as_text).to_list()
    except UnicodeDecodeError as err:
        raise LbdpoError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); re-save it as UTF-8") from None
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith(str(path)):  # already names the file
            raise
        raise LbdpoError(f"{path}: cannot be read as a {suffix} file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None


def load_hub(source: str, split: str | None) -> datasets.Dataset:
    """A hub dataset through ``datasets.load_dataset``; offline failures become a clear error."""
    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as err:  # the hub client raises many types; detect offline ones by type and text
        text = f"{type(err).__name__} {err}".lower()
        if isinstance(err, ConnectionError) or any(w in text for w in ("offline", "connect", "reach")):
            raise HubUnreachableError(
                f"could not load {source!r} from the Hugging Face hub (offline?): {err}. "
                "Pass a local .json/.jsonl/.csv/.parquet file or folder instead "
                "(e.g. ../shared/data/preference/...)."
            ) from err
        raise
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise LbdpoError(f"{source!r} has splits {sorted(loaded)}; pass split=")
        loaded = next(iter(loaded.values()))
    return loaded
