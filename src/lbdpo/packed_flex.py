"""Packed pairs under FlexAttention (``trainer.packed_attention=flex``): the rows of the block-mask layout
(:func:`lbdpo.packed_pairs.pack_pairs`), attended through ``torch.nn.attention.flex_attention`` under a ``BlockMask``
instead of a dense (R, 1, C, C) mask.

The mask is the layout's one rule (:func:`lbdpo.packed_pairs.may_attend`: same pair, causal, a response sees its
prompt and itself, not the other response) as a ``mask_mod`` over the per-token (pair id, part) tensors of the packing
and the token's column (a segment is contiguous, so column order is position order within it). Built once per batch
by :func:`pair_block_mask` — ``create_block_mask`` evaluates the rule for all (row, query, key) at once (vectorised,
no loop over pairs) and keeps, per 128 × 128 tile, whether it is empty, full or partial — so the kernel skips the
empty tiles (different pairs, the rejected response against the chosen one) instead of scoring them as sdpa does.

Where it runs: a decoder switched (:func:`enable_flex_attention`, done where the packed scorer is built) to the
attention function :data:`lbdpo.packed_pairs.FLEX_ATTENTION` (:func:`flex_pair_attention`): given a ``BlockMask`` it
runs FlexAttention — on an accelerator through transformers' own ``flex_attention_forward`` (``flex_attention``
compiled once per process; GQA, scaling) — and given anything else (unpacked rows, generation) sdpa, as before.
On the CPU it runs torch's unfused FlexAttention (the op's reference implementation, what eager ``flex_attention``
runs; it materialises the scores): torch 2.13's public ``flex_attention`` refuses a backward on CPU (eager and
compiled) and inductor's CPU kernel read past a partial tile (NaN) and then failed to compile for a second shape here.
So on the CPU this path is for exactness tests and dry runs, not speed (``segments`` is the CPU's packed attention).

Nothing happens at import: registration and the switch happen in :func:`enable_flex_attention`;
:func:`lbdpo.packed_pairs.restore_attention` switches back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .errors import RunStateError
from .packed_pairs import (FLEX_ATTENTION, PROMPT, PackedPairs, decoder_unsupported, may_attend,
                           packed_pair_token_logps, switch_attention)

TILE = 128  # FlexAttention's default BlockMask tile (torch.nn.attention.flex_attention._DEFAULT_SPARSE_BLOCK_SIZE)


def flex_unavailable() -> str | None:
    """Why this torch cannot run FlexAttention (None when it can)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (torch ≥ 2.5 has)"
    return None


def flex_unsupported(model) -> str | None:
    """Why ``model`` cannot run packed pairs under FlexAttention (None when it can or is switched already): torch must
    have FlexAttention, the model run sdpa (switched to :data:`FLEX_ATTENTION` for its packed forwards only), its
    decoder take a mask of lbdpo's (no sliding window, not remote code)."""
    if why := flex_unavailable():
        return why
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn not in ("sdpa", FLEX_ATTENTION):
        return (f"its attention implementation is {attn!r}, not 'sdpa' (load it with attn_implementation='sdpa': "
                "lbdpo switches it to FlexAttention for its packed forwards only)")
    return decoder_unsupported(model)


def enable_flex_attention(model) -> str | None:
    """Switch ``model`` (a transformers causal LM, or a peft one) to :data:`FLEX_ATTENTION` (registering it first):
    its packed forwards, given a ``BlockMask``, run FlexAttention; every other forward is sdpa's as before. None when
    done (or already), else why not (the model is left as it was). Undone by
    :func:`lbdpo.packed_pairs.restore_attention`."""
    return flex_unsupported(model) or switch_attention(model, FLEX_ATTENTION, flex_pair_attention)


def flex_pair_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                        scaling: float | None = None, **kwargs):
    """The attention of :data:`FLEX_ATTENTION`. query (R, heads, C, D), key and value (R, kv_heads, C, D) →
    ((R, C, heads, D), None). A ``BlockMask`` → FlexAttention (transformers' ``flex_attention_forward`` on an
    accelerator, :func:`reference_flex_attention` on the CPU); a tensor or None → sdpa (unpacked forwards)."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if query.device.type == "cpu":
        return reference_flex_attention(query, key, value, attention_mask, scaling), None
    from transformers.integrations.flex_attention import flex_attention_forward

    out, _ = flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    return out, None


def _score(score, batch, head, q_idx, k_idx):  # FlexAttention's score_mod: the scores as they are (no bias, no cap)
    return score


def reference_flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask,
                             scaling: float | None = None) -> torch.Tensor:
    """torch's unfused FlexAttention (the ``flex_attention`` higher-order op run eagerly: softmax(q kᵀ · scale, the
    mask_mod's −inf elsewhere) v, with its own backward), for the CPU, where the public ``flex_attention`` refuses a
    backward. query (R, heads, C, D), key and value (R, kv_heads, C, D) → (R, C, heads, D)."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op

    groups = query.shape[1] // key.shape[1]  # GQA: kv head j serves query heads j·groups … (j+1)·groups − 1
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, _, _ = flex_op(query, key, value, _score, block_mask.as_tuple(), scale, {})
    return out.transpose(1, 2).contiguous()


def pair_block_mask(packed: PackedPairs):
    """FlexAttention's ``BlockMask`` (R, 1, C, C) of a packing (on its device): :func:`may_attend` as a mask_mod over
    ``packed.pair`` and ``packed.part`` (R, C). Those are padded (pair −1, part prompt) to whole tiles first: a
    kernel may evaluate the mask_mod at columns past C in the last, partial tile, which must read real memory
    (inductor's CPU kernel read past it: NaN). Rebuilt per batch (a few tensor ops over R·C² entries, as the 4D mask
    of ``block_mask`` costs); the compiled attention kernel is not."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = packed.pair.shape
    pad = -(-width // TILE) * TILE - width
    pair, part = F.pad(packed.pair, (0, pad), value=-1), F.pad(packed.part, (0, pad), value=PROMPT)

    def mask_mod(b, h, q_idx, k_idx):  # (row, head, query column, key column) → may attend
        return may_attend(pair[b, q_idx], pair[b, k_idx], part[b, q_idx], part[b, k_idx], q_idx, k_idx)

    return create_block_mask(mask_mod, rows, None, width, width, device=packed.pair.device)


def flex_pair_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
                          chunk_size: int, **options):
    """:func:`lbdpo.packed_pairs.packed_pair_token_logps` (same arguments, same outputs: token log-probs (2B, T − 1),
    h (B, H)) with the rows attended under :func:`pair_block_mask`. ``model`` must be switched by
    :func:`enable_flex_attention`."""
    attn = model.config._attn_implementation
    if attn != FLEX_ATTENTION:
        raise RunStateError(f"{type(model).__name__} is not switched to FlexAttention (its implementation is {attn!r}):"
                            " call lbdpo.packed_flex.enable_flex_attention(model) first")
    return packed_pair_token_logps(model, input_ids, attention_mask, prompt_lengths, chunk_size,
                                   mask_builder=pair_block_mask, **options)
