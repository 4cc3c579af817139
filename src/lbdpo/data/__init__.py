"""Preference data: loading, tokenization with exact prompt/response boundaries, collation."""

from .collator import PreferenceCollator

__all__ = ["PreferenceCollator"]
