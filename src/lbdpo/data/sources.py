"""Reading the rows of a preference source: a local file or folder (``.json``/``.jsonl``/``.csv``/``.parquet``)
or a Hugging Face hub dataset. Errors name the file and, for JSON lines, the line.

:func:`read_local` (training) refuses a file with a malformed JSON line; :func:`read_local_located`
(``python -m lbdpo.data.check``) reads the same rows, each with its line, and lists the malformed lines instead.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetGenerationError

from ..errors import HubUnreachableError, LbdpoError, MissingFileError

KNOWN_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
FIX_LINE = "fix or remove the line; `python -m lbdpo.data.check FILE --rows` lists them"


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
            raise LbdpoError(f"{path}:{lineno}: malformed JSON line ({err.msg}, column {err.colno}); {FIX_LINE}") \
                from None


def _read_json(path: Path) -> list[Any]:
    """Rows of a ``.json``/``.jsonl`` file: one JSON list, or JSON lines (whatever the extension); a leading UTF-8
    byte-order mark is ignored."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.lstrip().startswith("["):
        return list(_read_json_lines(path, text))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise LbdpoError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno}); fix the file there "
                         "(a .json file is one JSON list, or one JSON object per line)") from None
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
    except DatasetGenerationError as err:  # datasets' wrapper of a CSV parser error (an empty file, …)
        cause = err.__cause__ or err
        raise LbdpoError(f"{path}: cannot be read as a {suffix} file ({type(cause).__name__}: "
                         f"{str(cause).splitlines()[0] if str(cause) else ''})") from None
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith(str(path)):  # already names the file
            raise
        raise LbdpoError(f"{path}: cannot be read as a {suffix} file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None


@dataclass
class LocatedRows:
    """The rows of one file as :func:`read_local` reads them, each with where it is, and the lines it could not read.

    ``where[i]`` locates ``rows[i]``: ``"LINE"`` (1-based) in a JSON file, ``"row N"`` (1-based data row) in a
    CSV/Parquet file. ``bad`` holds (``"LINE"``, why) of each unreadable line: a malformed JSON line, a line that
    is not UTF-8, or the point where a JSON list stops parsing (then ``rows`` is empty: the file is one value).
    """

    rows: list[Any] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _json_list_lines(text: str, count: int) -> list[str]:
    """The 1-based line where each of the ``count`` elements of a valid JSON list ``text`` starts."""
    decoder, lines = json.JSONDecoder(), []
    pos, line, seen = _WHITESPACE.match(text).end() + 1, 1, 0  # just after the "["
    for _ in range(count):
        pos = _WHITESPACE.match(text, pos).end()
        line, seen = line + text.count("\n", seen, pos), pos
        lines.append(str(line))
        pos = _WHITESPACE.match(text, decoder.raw_decode(text, pos)[1]).end() + 1  # past the "," (or the "]")
    return lines


def read_local_located(path: Path, text_columns: Iterable[str]) -> LocatedRows:
    """The rows of one local file with their lines (see :class:`LocatedRows`); an unreadable line is listed in
    ``bad``, not raised. A file that cannot be read at all (missing, not a data file) raises :class:`LbdpoError`."""
    if path.suffix.lower() not in (".json", ".jsonl"):
        rows = read_local(path, text_columns)
        return LocatedRows(rows, [f"row {i}" for i in range(1, len(rows) + 1)])
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LbdpoError(f"{path}: cannot be read ({type(err).__name__}: {err.strerror or err})") from None
    data = data.removeprefix(codecs.BOM_UTF8)  # as _read_json's utf-8-sig
    text = data.decode("utf-8", errors="replace")
    out = LocatedRows()
    if text.lstrip().startswith("["):  # one JSON list, read whole as read_local does
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            out.bad.append((str(data.count(b"\n", 0, err.start) + 1), f"not UTF-8 ({err.reason})"))
        except json.JSONDecodeError as err:
            out.bad.append((str(err.lineno), f"malformed JSON ({err.msg}, column {err.colno}); the list stops here"))
        else:
            out.rows, out.where = rows, _json_list_lines(text, len(rows))
        return out
    for lineno, raw in enumerate(data.split(b"\n"), start=1):  # "\n" only, as _read_json_lines
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            out.bad.append((str(lineno), f"not UTF-8 (byte {err.start} of the line: {err.reason})"))
            continue
        if not line.strip():
            continue
        try:
            out.rows.append(json.loads(line))
            out.where.append(str(lineno))
        except json.JSONDecodeError as err:
            out.bad.append((str(lineno), f"malformed JSON line ({err.msg}, column {err.colno})"))
    return out


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
