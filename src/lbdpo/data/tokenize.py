"""Tokenize preference pairs with an exact prompt/response boundary, for any chat template.

For every pair the model sees ``prompt_ids + response_ids`` where

- ``prompt_ids`` come from formatting the prompt ALONE: with ``prompt_format="chat"`` the tokenizer's
  chat template with the generation prompt (exactly what the model is conditioned on when it
  generates); with ``"raw"`` the prompt text as is (base models; HH transcripts keep their
  ``"\\n\\nHuman: … \\n\\nAssistant:"`` form).
- ``response_ids`` are the response text tokenized on its own, followed by the template's end-of-turn
  token (chat) or EOS (raw). A row may say that a response is NOT a finished turn, with an optional
  boolean column ``chosen_finished`` / ``rejected_finished`` set to false (sampled text cut at a token
  limit, as in the built-in ``sentiment`` data): that response gets no end-of-turn token, so the policy
  is not taught to end its turn where a length limit happened to fall. Missing or null means finished.

The two id lists are concatenated; the joined string is never re-tokenized, so no token straddles the
boundary and the response log-prob is log π(y | x) for exactly the x used at generation time. This
also holds for templates whose rendering of a finished conversation differs from the generation
prompt (DeepSeek-R1-Distill opens ``<think>\\n`` in the generation prompt but drops reasoning from
past assistant turns): we always condition on the generation prompt.

Truncation (``max_prompt_length``, ``max_length``): prompts lose tokens from the LEFT (their end, with
the generation prompt, is kept); responses lose tokens from the RIGHT. A pair whose response would be
empty, or whose prompt has fewer than 2 tokens, is skipped and counted by reason. A kept pair that was cut
is counted too, by what was cut (``TRUNCATION_REASONS``: the training banner's ``truncated`` row, and a
warning when more than half the pairs were cut, :func:`truncation_warning`).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, Sequence, Value
from transformers import PreTrainedTokenizerBase
from ..errors import LbdpoError

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("chat", "raw", "auto")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
TOKENIZED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
# What truncation cut in a kept pair, and the config key that sets the limit. A pair may be cut in several ways;
# "pairs_cut" in the counts is the number of pairs cut in any way.
TRUNCATION_REASONS = {
    "prompt_cut": "data.max_prompt_length",  # the prompt lost tokens from its start
    "chosen_cut": "data.max_length",  # the chosen response lost tokens from its end (prompt + it > max_length)
    "rejected_cut": "data.max_length",  # the same for the rejected response
}
MOSTLY_CUT = 0.5  # more than this fraction of a split's pairs cut → a warning
CUT_COLUMN = "lbdpo_truncated"  # encode_pairs' column of what was cut (a name no source column is likely to have)


@dataclass
class TokenizeConfig:
    """Options of :func:`tokenize_pairs` (the ``data`` Hydra group holds the same keys)."""

    prompt_format: str = "auto"  # chat | raw | auto (chat when the tokenizer has a chat template)
    max_length: int = 512  # max tokens of prompt + response
    max_prompt_length: int = 256  # max prompt tokens (left-truncated)
    num_proc: int | None = None  # processes for datasets.map (None = in process)

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise LbdpoError(f"data.prompt_format={self.prompt_format!r} must be one of {PROMPT_FORMATS}")
        if not 2 <= self.max_prompt_length < self.max_length:
            raise LbdpoError(
                f"data.max_prompt_length={self.max_prompt_length} must be ≥ 2 and < data.max_length={self.max_length}"
            )


def resolve_prompt_format(prompt_format: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """``auto`` → ``chat`` when the tokenizer has a chat template, else ``raw``; ``chat`` without a template errors."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "raw"
    if prompt_format == "chat" and not has_template:
        raise LbdpoError(
            f"data.prompt_format=chat but tokenizer {tokenizer.name_or_path!r} has no chat template; use raw"
        )
    return prompt_format


def hh_transcript_to_messages(prompt: str) -> list[dict[str, str]]:
    """Turn an HH prompt ``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` into messages
    [user a, assistant b, user c] (the trailing empty Assistant turn is the generation prompt)."""
    parts = _HH_TURN.split(prompt)
    # parts = [preamble, role1, text1, role2, text2, ...]
    messages = []
    for role, text in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise LbdpoError(f"HH prompt does not end with a Human turn: {prompt[-80:]!r}")
    return messages


def prompt_messages_of(row: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages of a row's prompt: ``prompt_messages`` (JSON) if set, an HH transcript's turns,
    or a single user message holding ``prompt``."""
    raw = row.get("prompt_messages") or ""
    if raw:
        return json.loads(raw) if isinstance(raw, str) else list(raw)
    if row.get("transcript_format") == "hh":
        return hh_transcript_to_messages(row["prompt"])
    return [{"role": "user", "content": row["prompt"]}]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> list[int]:
    """Token ids that close an assistant turn: the first special token the chat template writes after
    the assistant's content (``<|im_end|>`` for ChatML, ``<｜end▁of▁sentence｜>`` for DeepSeek), else EOS."""
    if prompt_format == "chat":
        marker = "XYZZY-MARKER"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        suffix = rendered[rendered.index(marker) + len(marker):]
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        for tid in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
            if tid in special:
                return [tid]
    if tokenizer.eos_token_id is None:
        raise LbdpoError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end responses with")
    return [tokenizer.eos_token_id]


class PairEncoder:
    """Callable for ``datasets.map(batched=True)``: string pairs → prompt/chosen/rejected ids + skip reason."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.prompt_format = resolve_prompt_format(config.prompt_format, tokenizer)
        self.eot = end_of_turn_ids(tokenizer, self.prompt_format)

    def prompt_ids(self, row: dict[str, Any]) -> list[int]:
        """Token ids of the formatted prompt alone (untruncated)."""
        if self.prompt_format == "chat":
            messages = prompt_messages_of(row)
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # the template already wrote BOS / special tokens where it wants them
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]

    def response_text(self, text: str) -> str:
        # HH responses begin with the space after "Assistant:"; in a chat turn that space is noise.
        return text.strip() if self.prompt_format == "chat" else text

    def response_ids(self, rows: list[dict[str, Any]], key: str) -> list[list[int]]:
        """Token ids of each row's ``key`` response, with the end-of-turn ids unless ``<key>_finished`` is false."""
        ids = self.tokenizer([self.response_text(r[key]) for r in rows], add_special_tokens=False)["input_ids"]
        finished = [row.get(f"{key}_finished") for row in rows]
        return [x + self.eot if x and (fin is None or bool(fin)) else x for x, fin in zip(ids, finished)]

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["prompt"])
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        chosen, rejected = self.response_ids(rows, "chosen"), self.response_ids(rows, "rejected")
        out: dict[str, list] = {c: [] for c in (*TOKENIZED_COLUMNS, "skip_reason", CUT_COLUMN)}
        for row, c_ids, r_ids in zip(rows, chosen, rejected):
            p, c, r, reason, cuts = self.encode_one(row, c_ids, r_ids)
            out["prompt_input_ids"].append(p)
            out["chosen_input_ids"].append(c)
            out["rejected_input_ids"].append(r)
            out["skip_reason"].append(reason)
            out[CUT_COLUMN].append(cuts)
        return out

    def encode_one(self, row, chosen_ids, rejected_ids) -> tuple[list[int], list[int], list[int], str, str]:
        """Apply truncation to one pair (responses already end with their end-of-turn ids, if any);
        returns (prompt, chosen, rejected, skip_reason or "", what was cut in a kept pair: comma-separated
        ``TRUNCATION_REASONS`` keys, "" when nothing was or the pair is skipped)."""
        cfg = self.config
        try:
            prompt = self.prompt_ids(row)
        except (ValueError, json.JSONDecodeError) as err:
            log.debug("unformattable prompt: %s", err)
            return [], [], [], "prompt_unformattable", ""
        cuts = ["prompt_cut"] if len(prompt) > cfg.max_prompt_length else []
        if cuts:
            prompt = prompt[-cfg.max_prompt_length:]  # keep the end: the question and the generation prompt
        if len(prompt) < 2:
            return [], [], [], "prompt_too_short", ""
        budget = cfg.max_length - len(prompt)
        chosen = chosen_ids[:budget]
        rejected = rejected_ids[:budget]
        if not chosen_ids or not rejected_ids or budget < 1:
            return [], [], [], "response_empty_after_truncation", ""
        if chosen == rejected:
            return [], [], [], "identical_after_truncation", ""
        cuts += [name for name, ids in (("chosen_cut", chosen_ids), ("rejected_cut", rejected_ids))
                 if len(ids) > budget]
        return prompt, chosen, rejected, "", ",".join(cuts)


def encode_pairs(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig, desc: str = "tokenize"
) -> Dataset:
    """Every row of ``dataset`` encoded, none removed: the ``TOKENIZED_COLUMNS`` (empty lists for a skipped pair),
    ``skip_reason`` (str, "" = kept) and ``CUT_COLUMN`` (str: comma-separated ``TRUNCATION_REASONS`` keys of a
    kept pair, "" = not cut) added; ``len`` unchanged (an empty dataset gets the empty columns)."""
    encoder = PairEncoder(tokenizer, config)
    if len(dataset) == 0:  # datasets.map never calls the encoder on no rows, so it would add no columns
        for name in TOKENIZED_COLUMNS:
            dataset = dataset.add_column(name, [], feature=Sequence(Value("int64")))
        for name in ("skip_reason", CUT_COLUMN):
            dataset = dataset.add_column(name, [], feature=Value("string"))
        return dataset
    return dataset.map(encoder, batched=True, batch_size=256, num_proc=config.num_proc, desc=desc)


def tokenize_pairs(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, config: TokenizeConfig, desc: str = "tokenize",
    truncated: Counter | None = None,
) -> tuple[Dataset, Counter]:
    """Tokenize a ``prompt``/``chosen``/``rejected`` dataset; metadata columns (``domain``, …) are kept.

    Args:
        truncated: a Counter to fill with what truncation cut in the kept pairs: one count per
            ``TRUNCATION_REASONS`` key that occurred, and ``pairs_cut`` (pairs cut in any way).

    Returns:
        (dataset with ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` added and skipped
        pairs removed, Counter of skip reasons).
    """
    encoded = encode_pairs(dataset, tokenizer, config, desc)
    skips = Counter(r for r in encoded["skip_reason"] if r)
    if truncated is not None:
        truncated.update(count_cuts(encoded[CUT_COLUMN]))
    if skips:
        encoded = encoded.filter(lambda reason: not reason, input_columns="skip_reason")
    return encoded.remove_columns(["skip_reason", CUT_COLUMN]), skips


def count_cuts(cuts: list[str]) -> Counter:
    """Counts of :func:`encode_pairs`' ``CUT_COLUMN`` values: per ``TRUNCATION_REASONS`` key, and ``pairs_cut``."""
    cut = [c for c in cuts if c]
    counts = Counter(name for c in cut for name in c.split(","))
    if cut:
        counts["pairs_cut"] = len(cut)
    return counts


def describe_truncation(truncated: Mapping[str, int], pairs: int) -> str:
    """``"3 of 10 pairs (30%): prompt_cut=3, chosen_cut=1"``, or ``"none"`` (``pairs``: the kept pairs)."""
    n = truncated.get("pairs_cut", 0)
    if not n:
        return "none"
    reasons = ", ".join(f"{k}={truncated[k]}" for k in TRUNCATION_REASONS if truncated.get(k))
    return f"{n} of {pairs} pairs ({n / max(pairs, 1):.0%}): {reasons}"


def truncation_warning(truncated: Mapping[str, int], pairs: int, split: str, config: TokenizeConfig) -> str | None:
    """A one-line warning when more than ``MOSTLY_CUT`` of a split's ``pairs`` were cut, naming the config keys
    (with their values) to raise; None otherwise."""
    n = truncated.get("pairs_cut", 0)
    if not pairs or n <= MOSTLY_CUT * pairs:
        return None
    values = {"data.max_prompt_length": config.max_prompt_length, "data.max_length": config.max_length}
    keys = dict.fromkeys(TRUNCATION_REASONS[k] for k in TRUNCATION_REASONS if truncated.get(k))
    how = "all" if n == pairs else "most"
    use = "the model trains on" if split == "train" else "evaluation scores"
    return (f"{how} {split} pairs were cut by truncation ({describe_truncation(truncated, pairs)}); {use} "
            f"fragments: raise {' / '.join(f'{k} (now {values[k]})' for k in keys)}")
