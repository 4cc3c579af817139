"""Known ground-truth reward functions for the built-in offline datasets.

``sentiment_reward`` is the reward of the ``sentiment`` dataset (the controlled-sentiment setting of the
DPO paper, sec. 6.1, rebuilt offline): the paper scores IMDb continuations with a sentiment classifier;
here the classifier is VADER (``vaderSentiment``), a rule- and lexicon-based scorer that needs no model
weights and no network.
"""

from __future__ import annotations

from typing import Any

_ANALYZER: Any = None


def _analyzer() -> Any:
    """The shared ``SentimentIntensityAnalyzer``, created on first use (loading the lexicon takes ~40 ms)."""
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def sentiment_reward(texts: list[str]) -> list[float]:
    """VADER compound sentiment score of each text, in [-1, 1] (positive = more positive sentiment).

    VADER sums the valences of words from an English lexicon (with rules for negation, intensifiers,
    punctuation, capitals and emoticons) and squashes the sum into [-1, 1]. Because the lexicon is English,
    the score is weak on other languages: Chinese or French text usually scores close to 0 unless it
    contains English words or emoticons. This is a known limitation of the ``sentiment`` dataset's reward
    (its ``zh`` and ``fr`` domains have smaller, noisier reward gaps), not a bug.

    Args:
        texts: the responses to score.

    Returns:
        One float per text, in the same order.
    """
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


__all__ = ["sentiment_reward"]
