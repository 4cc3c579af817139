"""Preference data: loading, tokenization with exact prompt/response boundaries, collation."""

from .collator import PreferenceCollator
from .loading import (
    FilterReport,
    load_mixture,
    load_preference_pairs,
    load_preference_pairs_with_report,
    train_eval_split,
)

__all__ = [
    "FilterReport",
    "PreferenceCollator",
    "load_mixture",
    "load_preference_pairs",
    "load_preference_pairs_with_report",
    "train_eval_split",
]
