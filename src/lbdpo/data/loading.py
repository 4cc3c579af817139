"""Load human-preference pairs from local files or the Hugging Face hub into one row format.

Every loader returns a :class:`datasets.Dataset` whose rows hold

    prompt             str  the prompt as plain text (for a conversation: the last user message)
    chosen, rejected   str  the two responses only, never the prompt
    prompt_messages    str  ``json.dumps`` of the prompt as a list of ``{"role","content"}`` messages for
                            conversational rows (every message before the final assistant reply); ``""``
                            for plain rows. A JSON string, not a nested column, so that sources with and
                            without conversations concatenate and the tokenizer step can ``json.loads``
                            it and apply the chat template to exactly these messages.
    transcript_format  str  ``"hh"`` for rows split out of Anthropic HH transcripts (the prompt is the raw
                            ``"\\n\\nHuman: ...\\n\\nAssistant:"`` text, to be tokenized as is), else ``"plain"``

plus every other column of the source unchanged (``source``, ``domain``, ``chosen_reward``, ...).

Input shapes are recognised from the column names (after ``columns=`` renaming) and the value types:

1. ``prompt``/``chosen``/``rejected`` strings, or the design documents' ``chosen_response``/``rejected_response``.
2. Anthropic HH: only ``chosen``/``rejected``, each a whole transcript. Both are split at their LAST
   ``"\\n\\nAssistant:"``; the prompt keeps that marker and the response keeps its leading space, so
   ``prompt + chosen`` is the original chosen transcript byte for byte.
3. Conversational: ``chosen``/``rejected`` as message lists (UltraFeedback-binarized: ``[user, ..., assistant]``)
   and/or ``prompt`` as a message list (TRL style: prompt messages + ``[assistant]``). The messages before the
   final assistant reply must be the same in chosen and rejected.
   A ``history`` column (OASST / LLaMA-Factory: ``[[user, assistant], ...]`` pairs, or a message list) plus a
   string ``prompt`` becomes ``prompt_messages = history turns + the prompt as the last user message``; an
   empty history leaves the row plain.

Already-split HH rows (``hh_helpful-base_train_sample``: prompt ``"Human: ..."`` without a trailing
``"\n\nAssistant:"``) are restored to the canonical HH prompt (leading ``"\n\n"``, trailing
``"\n\nAssistant:"``, responses with a leading space) and marked ``"hh"``.

A ``source`` that exists on disk is read locally; one that does not but looks like a path (starts with / . ~,
has two or more slashes, or a known extension) is a ``FileNotFoundError``; anything else (``name`` or
``org/name``) goes to ``datasets.load_dataset``.

Rows that cannot be used are dropped and counted by reason in a :class:`FilterReport` (see ``SKIP_REASONS``);
a required column missing from a whole file is an error instead. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .formats import RowSkipped, convert_row
from .sources import load_hub, local_files, looks_like_path, read_local
from ..errors import LbdpoError, MissingFileError

CORE_COLUMNS = ("prompt", "chosen", "rejected", "prompt_messages", "transcript_format")
# Other names accepted for our columns when the column itself is absent (the design documents' names).
COLUMN_ALIASES = {"chosen": ("chosen_response",), "rejected": ("rejected_response",)}
SKIP_REASONS = (
    "missing_field",  # a required value is absent or null in this row
    "not_a_string",  # a required value is a number/bool/... where text is needed
    "unparsable",  # the row is not an object, or a message list is malformed
    "hh_prompt_mismatch",  # HH transcripts lack "\n\nAssistant:" or differ before their last one
    "conversation_mismatch",  # chosen and rejected conversations differ before the final reply
    "empty_prompt",
    "empty_response",
    "chosen_equals_rejected",  # identical after stripping surrounding whitespace: no preference signal
)
MIXTURE_KEYS = {"path", "source", "domain", "split", "columns", "num_samples", "weight"}


@dataclass
class FilterReport:
    """How many rows a load read, kept (passed the filters), returned (after ``limit``/sampling) and
    skipped, by reason.

    A mixture's or a folder's report is the sum of its sources' / files' reports, kept in ``parts``
    (a folder's files are not sampled one by one: their ``rows_out`` is the rows they contributed).
    """

    source: str = ""
    rows_in: int = 0
    rows_kept: int = 0
    rows_out: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    parts: list[FilterReport] = field(default_factory=list)

    @property
    def rows_skipped(self) -> int:
        """Total rows dropped by the filters."""
        return sum(self.skipped.values())

    def count(self, reason: str) -> None:
        """Records one skipped row."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, other: FilterReport) -> None:
        """Adds another source's counts to this one and keeps it in ``parts`` (``rows_out`` is left to the
        caller, which knows what it returns)."""
        self.rows_in += other.rows_in
        self.rows_kept += other.rows_kept
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.parts.append(other)

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form for logging (parts nested)."""
        return asdict(self)

    def summary(self) -> str:
        """One line per nonzero skip reason, naming the source; one line in all when nothing was skipped."""
        reports = self.parts or [self]
        lines = [
            f"{r.source}: skipped {n} of {r.rows_in} rows ({reason})"
            for r in reports
            for reason, n in r.skipped.items()
            if n
        ]
        return "\n".join(lines) or f"{self.source}: kept all {self.rows_in} rows"


# --------------------------------------------------------------------------- row conversion


def _rename_columns(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """Applies ``columns`` (our name -> file name), then the design-document aliases."""
    out = {k: v for k, v in row.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in row:
            out[ours] = row[theirs]
    for ours, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if ours not in out and alias in out:
                out[ours] = out.pop(alias)
    return out


def _check_required_columns(names: set[str], origin: str, columns: Mapping[str, str]) -> None:
    """Raises when a file lacks chosen/rejected altogether (a whole-file error, not a row skip)."""
    missing = [c for c in ("chosen", "rejected") if c not in names]
    if missing:
        mapping = f" after columns={dict(columns)}" if columns else ""
        raise LbdpoError(
            f"{origin}: missing required column(s) {missing}{mapping}; found {sorted(names)}; expected "
            "prompt/chosen/rejected (or chosen_response/rejected_response), or HH transcripts chosen/rejected"
        )


def _convert_rows(rows: list[Any], origin: str, columns: Mapping[str, str], report: FilterReport,
                  skipped_at: list[tuple[int, str]] | None = None) -> list[dict]:
    """Renames, checks and converts the rows of one file (or hub split), counting skips in ``report`` (and, with
    ``skipped_at``, listing each as (index in ``rows``, reason))."""
    renamed = [_rename_columns(r, columns) if isinstance(r, dict) else r for r in rows]
    names = {k for r in renamed if isinstance(r, dict) for k in r}
    original = {k for r in rows if isinstance(r, dict) for k in r}
    absent = {ours: theirs for ours, theirs in columns.items() if theirs not in original}
    if rows and absent:
        raise LbdpoError(f"{origin}: data.columns maps {absent} but the file has no column(s) "
                         f"{sorted(absent.values())}; found {sorted(original)}")
    if renamed and not any(isinstance(r, dict) for r in renamed):
        raise LbdpoError(f"{origin}: rows are not JSON objects (found {type(renamed[0]).__name__}); expected one "
                         "object per line/element with prompt/chosen/rejected")
    if renamed:
        _check_required_columns(names, origin, columns)
    has_prompt = "prompt" in names
    kept = []
    for index, row in enumerate(renamed):
        report.rows_in += 1
        try:
            kept.append(convert_row(row, has_prompt))
        except RowSkipped as skip:
            report.count(skip.args[0])
            if skipped_at is not None:
                skipped_at.append((index, skip.args[0]))
    report.rows_kept += len(kept)
    return kept


def _to_dataset(records: list[dict[str, Any]]) -> datasets.Dataset:
    """A Dataset over the union of the records' keys (missing values are None). A metadata column whose
    values mix types Arrow cannot unify (say str and dict) is stored as JSON strings instead."""
    if not records:
        features = datasets.Features(dict.fromkeys(CORE_COLUMNS, datasets.Value("string")))
        return datasets.Dataset.from_dict({c: [] for c in CORE_COLUMNS}, features=features)
    names = list(dict.fromkeys(k for r in records for k in r))
    table = {name: [r.get(name) for r in records] for name in names}
    for name, values in table.items():
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            table[name] = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
    return datasets.Dataset.from_dict(table)


# --------------------------------------------------------------------------- public API


def _subsample(ds: datasets.Dataset, n: int | None, seed: int | None) -> datasets.Dataset:
    """``n`` rows: the first ``n`` when ``seed`` is None, else a seeded sample kept in source order."""
    if n is None or n >= len(ds):
        return ds
    if n < 0:
        raise LbdpoError(f"limit/num_samples must be >= 0, got {n}")
    if seed is None:
        return ds.select(range(n))
    picked = np.random.default_rng(seed).choice(len(ds), size=n, replace=False)
    return ds.select(np.sort(picked))


def load_preference_pairs(
    source: str | Path,
    split: str | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    domain: str | None = None,
    limit: int | None = None,
    seed: int | None = 0,
    report: FilterReport | None = None,
) -> datasets.Dataset:
    """Loads preference pairs as a Dataset with string ``prompt``/``chosen``/``rejected`` (see module doc).

    Args:
        source: a local ``.json`` (list or JSON lines) / ``.jsonl`` / ``.csv`` / ``.parquet`` file, a folder
            of them (concatenated in name order), or a hub id for ``datasets.load_dataset``.
        split: hub split (ignored for local files).
        columns: our name -> the source's name, e.g. ``{"prompt": "question", "chosen": "good"}``.
        domain: if given, sets a string ``domain`` column on every row.
        limit: keep ``limit`` of the rows that pass the filters: a sample drawn with ``seed`` and kept in
            source order, or the first ``limit`` rows when ``seed`` is None.
        report: a :class:`FilterReport` to fill with the counts of rows read, kept and skipped by reason.
    """
    columns = dict(columns or {})
    report = report if report is not None else FilterReport()
    report.source = report.source or str(source)
    path = Path(source).expanduser()
    records: list[dict[str, Any]] = []
    if path.exists():
        csv_text_columns = {columns.get(c, c) for c in CORE_COLUMNS[:3]} | {"chosen_response", "rejected_response"}
        files = local_files(path)
        for file in files:
            # a folder reports per file, so that its summary names the file each skip came from
            part = FilterReport(source=str(file)) if len(files) > 1 else report
            records += _convert_rows(read_local(file, csv_text_columns), str(file), columns, part)
            if part is not report:
                part.rows_out = part.rows_kept
                report.add(part)
    elif isinstance(source, Path) or looks_like_path(str(source)):
        raise MissingFileError(f"preference data not found: {source} (resolved to {path.resolve()})")
    else:
        hub = load_hub(str(source), split)
        records = _convert_rows(list(hub), f"{source} [{split or 'default split'}]", columns, report)
    if domain is not None:
        for record in records:
            record["domain"] = domain
    ds = _subsample(_to_dataset(records), limit, seed)
    report.rows_out += len(ds)
    return ds


def load_preference_pairs_with_report(
    source: str | Path, split: str | None = None, **kwargs: Any
) -> tuple[datasets.Dataset, FilterReport]:
    """:func:`load_preference_pairs` (same keyword arguments), also returning the filled :class:`FilterReport`."""
    report = kwargs.pop("report", None) or FilterReport()
    return load_preference_pairs(source, split, report=report, **kwargs), report


def _align_features(parts: list[datasets.Dataset]) -> list[datasets.Dataset]:
    """Gives every dataset the same columns (missing ones filled with None) and the same features (a
    column whose type differs between sources is stored as JSON strings), so they concatenate."""
    features: dict[str, Any] = {}
    conflicts: set[str] = set()
    for ds in parts:
        for name, feat in ds.features.items():
            if name in features and features[name] != feat and datasets.Value("null") not in (features[name], feat):
                conflicts.add(name)
            elif name not in features or features[name] == datasets.Value("null"):
                features[name] = feat
    aligned = []
    for ds in parts:
        for name in conflicts & set(ds.column_names):
            ds = ds.map(
                lambda b, n=name: {n: [None if v is None else json.dumps(v, ensure_ascii=False) for v in b[n]]},
                batched=True,
                features=datasets.Features({**ds.features, name: datasets.Value("string")}),
            )
        for name, feat in features.items():
            if name not in ds.column_names:
                feat = datasets.Value("string") if name in conflicts else feat
                ds = ds.add_column(name, [None] * len(ds), feature=feat)
        aligned.append(ds.select_columns(list(features)))
    return aligned


def load_mixture(sources: list[Mapping[str, Any]], seed: int = 0) -> tuple[datasets.Dataset, FilterReport]:
    """Loads several sources into one shuffled Dataset with a ``domain`` column.

    Each spec has ``path`` (or ``source``), ``domain`` (default: the file stem / hub id), and optionally
    ``split``, ``columns``, and ``num_samples`` (rows) or ``weight`` (fraction of that source's usable rows,
    rounded); without either the whole source is used. Samples are drawn with ``seed`` (offset per source),
    then everything is concatenated and shuffled with ``seed``. Columns present only in some sources are
    filled with None elsewhere.
    """
    report = FilterReport(source="mixture")
    parts = []
    for i, spec in enumerate(sources):
        unknown = set(spec) - MIXTURE_KEYS
        if unknown or ("path" in spec) == ("source" in spec) or ("num_samples" in spec and "weight" in spec):
            raise LbdpoError(
                f"mixture source {i} {dict(spec)}: needs exactly one of path/source, at most one of "
                f"num_samples/weight; allowed keys {sorted(MIXTURE_KEYS)}"
            )
        source = spec.get("path", spec.get("source"))
        ds, part = load_preference_pairs_with_report(
            source, spec.get("split"), columns=spec.get("columns"), domain=spec.get("domain"), report=FilterReport()
        )
        if len(ds) == 0:
            reasons = "; ".join(f"{k}={v}" for k, v in part.skipped.items() if v) or "the source has no rows"
            raise LbdpoError(f"{source}: no usable preference pairs ({part.rows_in} rows read; skipped: {reasons}); "
                             "`python -m lbdpo.data.check FILE --rows` lists the bad rows")
        if "domain" not in ds.column_names:  # keep a file's own per-row domains unless the spec names one
            ds = ds.add_column("domain", [Path(str(source)).stem] * len(ds))
        n = spec.get("num_samples")
        if "weight" in spec:
            n = round(float(spec["weight"]) * len(ds))
        if n is not None and n > len(ds):
            raise LbdpoError(f"mixture source {source}: num_samples={n} but only {len(ds)} usable rows")
        ds = _subsample(ds, n, seed + i)
        part.rows_out = len(ds)
        report.add(part)
        parts.append(ds)
    if not parts:
        raise LbdpoError("load_mixture needs at least one source")
    mixed = datasets.concatenate_datasets(_align_features(parts))
    report.rows_out = len(mixed)
    return mixed.shuffle(seed=seed).flatten_indices(), report


def train_eval_split(
    ds: datasets.Dataset, eval_fraction: float | None = None, eval_size: int | None = None, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Deterministic (train, eval) split: give exactly one of ``eval_fraction`` (0-1) or ``eval_size`` (rows)."""
    if (eval_fraction is None) == (eval_size is None):
        raise LbdpoError("give exactly one of eval_fraction or eval_size")
    if eval_fraction is not None and not 0 < float(eval_fraction) < 1:
        raise LbdpoError(f"data.eval_fraction={eval_fraction} must be in (0, 1) (or null, with data.eval_size)")
    if eval_size is not None and int(eval_size) < 0:
        raise LbdpoError(f"data.eval_size={eval_size} must be ≥ 0 (or null, with data.eval_fraction)")
    size = int(eval_size) if eval_size is not None else round(eval_fraction * len(ds))
    if size == 0:
        return ds, ds.select([])
    if size >= len(ds):
        raise LbdpoError(f"data.eval_size/eval_fraction: an eval split of {size} rows leaves no training rows (the "
                         f"data has {len(ds)} usable pairs)")
    parts = ds.train_test_split(test_size=size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def hold_out_pairs(ds: datasets.Dataset, fraction: float, seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``data.beta_val_fraction``: a seeded slice of the training pairs held out from the policy (the held-out pairs of
    ``beta_head.objective=validation``). Returns (the rest, the slice), each in ``ds``'s order; a fraction of 0 returns
    ``ds`` itself and an empty slice. The slice depends on ``seed`` and ``ds`` only (not on the β mode), so every arm
    of an experiment with the same fraction and seed trains on the same pairs. round(fraction · len(ds)) pairs, at
    least 1 for a fraction > 0; an error naming the key when that leaves no training pair."""
    if not 0 <= float(fraction) < 1:
        raise LbdpoError(f"data.beta_val_fraction={fraction} must be in [0, 1) (or null: 0.1 under "
                         "beta_head.objective=validation, else 0)")
    if fraction == 0:
        return ds, ds.select([])
    size = max(1, round(float(fraction) * len(ds)))
    if size >= len(ds):
        raise LbdpoError(f"data.beta_val_fraction={fraction}: holding out {size} of {len(ds)} training pairs leaves "
                         "none to train on; lower it or add pairs")
    picked = np.random.default_rng([int(seed), 0xBE7A]).permutation(len(ds))[:size]  # its own stream, not the splits'
    held = np.zeros(len(ds), dtype=bool)
    held[picked] = True
    return ds.select(np.flatnonzero(~held)), ds.select(np.flatnonzero(held))
