"""Label noise as a data option: chosen and rejected swapped in a seeded fraction of one domain's training pairs.

    data.label_noise: {domain: en_plain, fraction: 0.4}      # default null: no noise

Of the n training pairs of ``domain`` (after loading, splitting, ``max_train_pairs`` and tokenization: the pairs the
run trains on), k = ⌊fraction · n + ½⌋ (rounded half up) are drawn without replacement by a generator seeded with the
run's ``seed``, and in each of them every ``chosen…`` column is swapped with its ``rejected…`` partner (the text, the
token ids, ``chosen_finished``, ``chosen_reward``, …), so a flipped pair is the same pair with the preference
reversed. The held-out pairs are never touched (they are split off before, or read from their own files), nor is the
evaluation reward. The same seed flips the same pairs, resumed runs included; another seed flips another set.
:func:`apply_label_noise` returns the count for the run's banner.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from datasets import Dataset

from ..errors import LbdpoError

NOISE_KEYS = ("domain", "fraction")
SEED_SALT = 0x6C6E6F69  # mixed into the run's seed: the flip draw is its own stream, not the data order's


def parse_label_noise(value: Any) -> tuple[str, float] | None:
    """``data.label_noise`` as (domain, fraction), None when null; an :class:`LbdpoError` naming the key otherwise."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != set(NOISE_KEYS):
        raise LbdpoError(f"data.label_noise={value!r} must be null or {{domain: NAME, fraction: F}}, e.g. "
                         "'data.label_noise={domain: en_plain, fraction: 0.4}'")
    domain, fraction = value["domain"], value["fraction"]
    if not isinstance(domain, str) or not domain:
        raise LbdpoError(f"data.label_noise.domain={domain!r} must be the name of a training domain")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise LbdpoError(f"data.label_noise.fraction={fraction!r} must be a number in [0, 1]")
    return domain, float(fraction)


def flipped_indices(domains: list[str | None], domain: str, fraction: float, seed: int) -> list[int]:
    """The rows to flip: ⌊fraction · n + ½⌋ of the n rows whose domain is ``domain``, drawn with ``seed``; sorted."""
    rows = [i for i, d in enumerate(domains) if d == domain]
    k = math.floor(fraction * len(rows) + 0.5)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**32, SEED_SALT]))
    return sorted(rows[int(j)] for j in rng.choice(len(rows), size=k, replace=False))


def swap_columns(ds: Dataset, indices: list[int]) -> Dataset:
    """``ds`` with every ``…chosen…`` column swapped with its ``…rejected…`` partner in the rows ``indices``."""
    pairs = [(c, c.replace("chosen", "rejected")) for c in ds.column_names
             if "chosen" in c and c.replace("chosen", "rejected") in ds.column_names]
    if not pairs:
        raise LbdpoError(f"data.label_noise: the data has no chosen/rejected columns to swap ({ds.column_names})")
    flip = set(indices)

    def swap(batch: dict[str, list], idx: list[int]) -> dict[str, list]:
        out = {}
        for a, b in pairs:
            out[a] = [y if i in flip else x for i, x, y in zip(idx, batch[a], batch[b])]
            out[b] = [x if i in flip else y for i, x, y in zip(idx, batch[a], batch[b])]
        return out

    return ds.map(swap, batched=True, with_indices=True, desc="label noise")


def apply_label_noise(train_ds: Dataset, value: Any, seed: int) -> tuple[Dataset, dict[str, Any] | None]:
    """Flip ``data.label_noise`` (see the module docstring) in the training pairs ``train_ds``.

    Returns:
        (the dataset, with the chosen/rejected columns of the drawn pairs swapped; ``{"domain", "fraction",
        "domain_pairs", "flipped"}`` for the banner and the run's data report), or ``(train_ds, None)`` when
        ``value`` is null.
    """
    parsed = parse_label_noise(value)
    if parsed is None:
        return train_ds, None
    domain, fraction = parsed
    domains = list(train_ds["domain"]) if "domain" in train_ds.column_names else [None] * len(train_ds)
    if domain not in set(domains):
        raise LbdpoError(f"data.label_noise.domain={domain!r}: no training pair has that domain; the training "
                         f"domains are {sorted(str(d) for d in set(domains))}")
    indices = flipped_indices(domains, domain, fraction, seed)
    noisy = swap_columns(train_ds, indices) if indices else train_ds
    return noisy, {"domain": domain, "fraction": fraction, "domain_pairs": domains.count(domain),
                   "flipped": len(indices)}
