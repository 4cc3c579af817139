"""Collate tokenized preference triples into the batch contract of :mod:`lbdpo.dpo_model`.

A feature is a dict with
    prompt_input_ids    list[int]  the (templated) prompt, ≥ 2 tokens
    chosen_input_ids    list[int]  the chosen response, already ending with the end-of-turn/EOS token
    rejected_input_ids  list[int]  the rejected response, likewise
and optionally ``reference_chosen_logps`` / ``reference_rejected_logps`` (floats, precomputed
reference) and any string/int metadata (``domain``, ``index``) that is passed through as a list.

Each row is ``prompt_ids + response_ids`` concatenated as ids: the text is never re-tokenized, so the
prompt/response boundary is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from ..errors import LbdpoError


IGNORE_INDEX = -100  # label of prompt and padding positions: no loss, no log-prob counted
PASSTHROUGH_KEYS = ("domain", "index")
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


def pad_rows(rows: Sequence[Sequence[int]], pad_value: int, padding_side: str = "right",
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into one tensor: the one padding helper of the package.

    Args:
        rows: N lists of ids; pad_value: id written at padded positions; padding_side: "right" or "left";
        width: T (default: the longest row).

    Returns:
        ``ids`` (N, T) long and ``attention_mask`` (N, T) long, 1 on the rows' own entries. Built from padded Python
        lists in two tensor constructions (not per row: a training step's host work, benchmarks/host_ops.py).
    """
    if padding_side not in ("left", "right"):
        raise LbdpoError(f"padding_side={padding_side!r} must be 'left' or 'right'")
    rows = [list(r) for r in rows]
    width = max(len(r) for r in rows) if width is None else width
    if any(len(r) > width for r in rows):
        raise LbdpoError(f"a row of {max(len(r) for r in rows)} ids does not fit width={width}")
    right = padding_side == "right"
    ids = [r + [pad_value] * (width - len(r)) if right else [pad_value] * (width - len(r)) + r for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) if right else [0] * (width - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids, dtype=torch.long).reshape(len(rows), width), \
        torch.tensor(mask, dtype=torch.long).reshape(len(rows), width)


@dataclass
class PreferenceCollator:
    """Pads B pairs into 2B rows: chosen rows first, then rejected rows.

    Args:
        pad_token_id: id written at padded positions (masked out everywhere).
        padding_side: "right" (default, training) or "left".
        pad_to_multiple_of: round T up to a multiple of this (e.g. 8 for tensor cores); None = no rounding.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise LbdpoError(f"padding_side={self.padding_side!r} must be 'left' or 'right'")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Returns ``input_ids``, ``attention_mask``, ``labels`` (2B, T), ``prompt_lengths`` (B,), plus
        reference log-probs (B,) and passthrough metadata lists when the features carry them."""
        rows, labels, prompt_lengths = [], [], []
        for response_key in ("chosen_input_ids", "rejected_input_ids"):
            for feat in features:
                prompt, response = list(feat["prompt_input_ids"]), list(feat[response_key])
                if len(prompt) < 2 or len(response) < 1:
                    raise LbdpoError(
                        f"pair needs a prompt of ≥ 2 tokens and a non-empty response; got {len(prompt)} "
                        f"prompt and {len(response)} {response_key[:-10]} tokens"
                    )
                rows.append(prompt + response)
                labels.append([IGNORE_INDEX] * len(prompt) + response)
                if response_key == "chosen_input_ids":
                    prompt_lengths.append(len(prompt))

        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids, attention_mask = pad_rows(rows, self.pad_token_id, self.padding_side, width)
        label_ids, _ = pad_rows(labels, IGNORE_INDEX, self.padding_side, width)

        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": label_ids,
            "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long),
        }
        if all(k in features[0] for k in REFERENCE_KEYS):
            for k in REFERENCE_KEYS:
                batch[k] = torch.tensor([float(f[k]) for f in features], dtype=torch.float32)
        for k in PASSTHROUGH_KEYS:
            if k in features[0]:
                batch[k] = [f[k] for f in features]
        return batch
