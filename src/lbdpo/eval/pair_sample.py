"""The held-out pairs as a sample: each pair's identity, and a bootstrap over pairs aligned by it.

Each seed's held-out pairs are shuffled with that seed (``load_mixture`` → ``shuffle(seed)``; with
``data.eval_fraction`` the seed also picks which pairs are held out), so pair i of seed 0 is not pair i of seed 1.
A pair's identity is its **key**: the ``key`` field of ``eval_pairs.jsonl`` when the file has one, else the first 16
hex digits of sha1(json([prompt, chosen, rejected])) of the pairs that the run's data config and seed
(``.hydra/config.yaml``) produce — the same loading as evaluate.py (``build_datasets`` without tokenisation), taken
only when the file's row count and its domains, row by row, agree with it and evaluate.py's tokenizer skipped no
pair. Without keys there is no pair bootstrap (positional alignment would mix different pairs).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np


def pair_key(prompt, chosen, rejected) -> str:
    """A pair's identity: sha1 of its prompt, chosen and rejected response (strings or conversations), 16 hex."""
    text = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def held_out_dataset(data: dict, seed: int):
    """The held-out pairs (a ``datasets.Dataset`` with prompt, chosen, rejected[, domain]) of the resolved data config
    ``data`` at ``seed``, in the order ``lbdpo.build.build_datasets`` gives them to evaluate.py (before its
    ``max_eval_pairs`` cut): the ``eval`` sources, else the seeded split of ``train``. None when the config has no
    held-out pairs or the data cannot be read here."""
    from ..build import data_sources  # lazy: lbdpo.build loads torch
    from ..data.loading import load_mixture, train_eval_split
    from ..errors import LbdpoError

    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a compare.md rebuild prints its table, not a bar per seed
    try:
        if data_sources(data.get("eval")):
            held, _ = load_mixture(data_sources(data["eval"]), seed=seed)
        elif data.get("eval_fraction") or data.get("eval_size"):
            train, _ = load_mixture(data_sources(data["train"]), seed=seed)
            _, held = train_eval_split(train, eval_fraction=data.get("eval_fraction"),
                                       eval_size=data.get("eval_size"), seed=seed)
        else:
            return None
    except (LbdpoError, OSError, ValueError):
        return None
    finally:
        if bars:
            datasets.enable_progress_bars()
    return held


@functools.lru_cache(maxsize=64)
def _held_out(data_json: str, seed: int) -> tuple[tuple[str, str], ...] | None:
    """(key, domain) of every pair of :func:`held_out_dataset` (``data_json``: the data config as JSON)."""
    held = held_out_dataset(json.loads(data_json), seed)
    if held is None:
        return None
    domains = held["domain"] if "domain" in held.column_names else [""] * len(held)
    return tuple((pair_key(p, c, r), d) for p, c, r, d in zip(held["prompt"], held["chosen"], held["rejected"],
                                                                domains))


def held_out_keys(config: dict, eval_json: dict, rows: Sequence[dict]) -> list[str] | None:
    """The key of each row of a run's ``eval_pairs.jsonl`` (``rows``), reconstructed from its config (the ``data``
    group and ``seed``) and checked against ``eval_json`` (no tokenizer skips) and the rows' domains; None when any
    check fails."""
    from omegaconf import OmegaConf

    data, seed = config.get("data"), config.get("seed")
    skips = ((eval_json.get("data") or {}).get("filters") or {}).get("eval_tokenizer_skips") or {}
    if not isinstance(data, dict) or seed is None or any(skips.values()):
        return None
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except Exception:  # an unresolvable interpolation: no keys, no pair bootstrap
        return None
    held = _held_out(json.dumps(resolved, sort_keys=True), int(seed))
    if held is None or len(held) < len(rows):
        return None
    if any(d and row.get("domain") not in (None, d) for (_, d), row in zip(held, rows)):
        return None
    return [k for k, _ in held[:len(rows)]]


def read_held_out(eval_json_path: Path | None, config: dict, eval_json: dict) -> dict[str, bool] | None:
    """{pair key: ranked right (Δ > 0)} of a run's held-out pairs, from the ``eval_pairs.jsonl`` beside its
    ``eval.json``; None without the file or without keys (module docstring)."""
    path = eval_json_path.parent / "eval_pairs.jsonl" if eval_json_path is not None else None
    if path is None or not path.is_file():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        correct = [bool(row["correct"]) for row in rows]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    keys = [row.get("key") for row in rows]
    if not all(keys):
        keys = held_out_keys(config, eval_json, rows)
    if keys is None or len(set(keys)) != len(keys):
        return None
    return dict(zip(keys, correct))


def pair_bootstrap(a: Sequence[dict[str, bool]], b: Sequence[dict[str, bool]], reps: int = 2000,
                   seed: int = 0) -> dict[str, float] | None:
    """Mean accuracy of arm a's runs − that of arm b's, and the 2.5/97.5 percentiles of that difference over
    ``reps`` resamplings of the pairs by identity; seeds stay seeds (no run is resampled).

    ``a``, ``b``: per run, {pair key: ranked right}. Each run's accuracy is over its own held-out pairs. A resample
    draws the union of the keys with replacement; a pair drawn k times counts k times in every run that holds it
    out, so one pair's effect moves every seed at once. None when an arm has no run."""
    if not a or not b:
        return None
    runs = [*a, *b]
    keys = sorted(set().union(*runs))
    index = {k: i for i, k in enumerate(keys)}
    right, held = np.zeros((len(runs), len(keys))), np.zeros((len(runs), len(keys)))
    for r, run in enumerate(runs):
        for k, ok in run.items():
            held[r, index[k]], right[r, index[k]] = 1.0, float(ok)
    weights = np.random.default_rng(seed).multinomial(len(keys), np.full(len(keys), 1 / len(keys)), size=reps)

    def diff(w: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = (w @ right.T) / (w @ held.T)
        return acc[..., :len(a)].mean(-1) - acc[..., len(a):].mean(-1)

    draws = diff(weights.astype(float))
    draws = draws[np.isfinite(draws)]
    return {"diff": float(diff(np.ones(len(keys)))), "low": float(np.percentile(draws, 2.5)),
            "high": float(np.percentile(draws, 97.5)), "pairs": len(keys)}
