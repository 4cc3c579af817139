"""The forward: how a model scores a batch of preference pairs. One interface, chosen once from the config and called
alike for the policy, the reference and evaluation (:class:`Scorer`).

Two paths, the same numbers (tests against one unpadded sequence at a time):

    rows     the 2B padded rows of the batch contract (prompt + chosen, prompt + rejected): each prompt computed twice.
             Log-probs from the full logits (N, T, V), or with ``chunk_size`` from the last hidden state, that many
             positions of lm_head at a time (:mod:`lbdpo.chunked_logps`, no vocabulary-sized tensor).
    packed   each pair one segment [prompt | chosen | rejected] (:mod:`lbdpo.packed_pairs`): each prompt computed once,
             chunked log-probs. Layout ``segments`` (one row without padding, attention per segment: least work),
             ``block_mask`` (rows under one 4D mask: fewest kernels) or ``flex`` (the same rows under FlexAttention's
             BlockMask, :mod:`lbdpo.packed_flex`: empty tiles skipped; opt-in until measured on a GPU).

``trainer.forward`` (auto | rows | packed) and ``trainer.packed_attention`` (auto | segments | block_mask | flex) pick one;
:func:`plan_forward` resolves them against a model. ``auto`` takes the default measured fastest on the device
(:func:`resolve_forward`) and, where the model cannot run it, the next path with one log line. A path asked for
explicitly that the model cannot run is refused with an :class:`lbdpo.errors.LbdpoError`, never replaced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch

from .chunked_logps import chunked_token_logps, chunking_unsupported, decoder_hidden_and_head
from .data.collator import IGNORE_INDEX
from .errors import LbdpoError
from .logprobs import (forward_model, last_prompt_token_index, position_ids_from_mask, prompt_ppl_mask,
                       response_logps, row_attention_mask, row_mask_kind, token_logps)
from .packed_flex import flex_pair_token_logps, flex_unsupported
from .packed_pairs import packed_pair_token_logps, packing_unsupported, segment_attention_unsupported

log = logging.getLogger(__name__)

FORWARDS = ("rows", "packed")  # trainer.forward (and auto)
PACKED_ATTENTION = ("segments", "block_mask", "flex")  # trainer.packed_attention (and auto, which never picks flex)
PACKED_CHUNK_SIZE = 1024  # lm_head positions per chunk on the packed path when trainer.logps_chunk_size is null


def resolve_forward(forward: str | None, packed_attention: str | None, device: torch.device | str,
                    compiled: bool = False) -> tuple[str, str | None]:
    """``auto`` (or None) → the measured default for ``device`` (docs/performance.md, benchmarks/RESULTS.md):
    forward = packed on CPU (3.07× TRL's step on SmolLM2), rows on an accelerator (H200, Qwen2.5-0.5B architecture:
    0.182 s/step against 0.272 packed); packed_attention = segments on CPU, block_mask on an accelerator or under
    torch.compile; never flex (opt-in until a GPU measures it). Returns (forward, packed_attention or None for rows);
    explicit values pass through."""
    on_cpu = torch.device(device).type == "cpu"
    if forward in (None, "auto"):
        forward = "packed" if on_cpu else "rows"
    if forward == "rows":
        return forward, None
    if packed_attention in (None, "auto"):
        packed_attention = "segments" if on_cpu and not compiled else "block_mask"
    return forward, packed_attention


@dataclass(frozen=True)
class ForwardPlan:
    """The path a model's batches take: ``forward`` rows | packed; ``packed_attention`` segments | block_mask | flex
    with packed (None with rows); ``chunk_size`` lm_head positions per chunk (None: full logits, rows only);
    ``pad_to_multiple_of`` the packed rows' length rounded up (padding: no number changes); ``bucket_shapes``: the
    rows of ``block_mask`` and ``flex`` (not ``segments``' one row) bucketed to few (rows, width) shapes
    (:func:`lbdpo.packed_pairs.pack_pairs`; padding too)."""

    forward: str
    packed_attention: str | None
    chunk_size: int | None
    pad_to_multiple_of: int | None = None
    bucket_shapes: bool = False

    def describe(self) -> str:
        """E.g. ``packed pairs, attention per segment (one row)``: the banner's "forward" row."""
        if self.forward == "packed":
            layout = "attention per segment (one row)" if self.packed_attention == "segments" else \
                ("rows under a FlexAttention block mask" if self.packed_attention == "flex" else
                 "rows under a block mask") + (", bucketed shapes" if self.bucket_shapes else "")
            return f"packed pairs, {layout}"
        return "one row per response, " + (f"chunked log-probs ({self.chunk_size})" if self.chunk_size else
                                           "full logits")


def plan_forward(model, forward: str = "rows", packed_attention: str = "auto", chunk_size: int | None = None,
                 pad_to_multiple_of: int | None = None, device: torch.device | str | None = None,
                 compiled: bool = False) -> ForwardPlan:
    """The :class:`ForwardPlan` of ``model`` (a transformers causal LM or a peft one) for these options.

    ``forward``/``packed_attention``: a value of :data:`FORWARDS`/:data:`PACKED_ATTENTION` or ``auto``
    (:func:`resolve_forward`; ``device`` defaults to the model's). Explicit choices the model cannot run raise an
    :class:`LbdpoError` naming the option; ``auto`` falls back (packed → rows, segments → block_mask) with one log line.
    """
    if forward not in ("auto", *FORWARDS):
        raise LbdpoError(f"trainer.forward={forward!r} must be auto, rows or packed")
    if packed_attention not in ("auto", *PACKED_ATTENTION):
        raise LbdpoError(f"trainer.packed_attention={packed_attention!r} must be auto, segments, block_mask or flex")
    if chunk_size is not None and int(chunk_size) < 1:
        raise LbdpoError(f"trainer.logps_chunk_size={chunk_size} must be ≥ 1 or null")
    if device is None:
        device = next(model.parameters()).device
    auto_forward, auto_layout = forward == "auto", packed_attention == "auto"
    forward, layout = resolve_forward(forward, packed_attention, device, compiled)
    chunk_size = int(chunk_size) if chunk_size else None
    if forward == "packed":
        why = chunking_unsupported(model) or packing_unsupported(model)
        if why and not auto_forward:
            raise LbdpoError(f"trainer.forward=packed: {type(model).__name__} cannot run packed pairs ({why}); "
                             "set trainer.forward=rows (or auto)")
        if why:
            log.info("trainer.forward=auto: one row per response, since %s cannot run packed pairs (%s)",
                     type(model).__name__, why)
            forward, layout = "rows", None
    if forward == "packed" and layout == "segments" and (why := segment_attention_unsupported(model)):
        if not auto_layout:
            raise LbdpoError(f"trainer.packed_attention=segments: {why}; set trainer.packed_attention=block_mask "
                             "(or auto)")
        log.info("trainer.packed_attention=auto: rows under a block mask, since %s", why)
        layout = "block_mask"
    if forward == "packed" and layout == "flex":  # asked for (auto never picks it)
        check_flex(model, torch.device(device).type == "cpu", compiled)
    if forward == "packed":
        chunk_size = chunk_size or PACKED_CHUNK_SIZE
    elif chunk_size and (why := chunking_unsupported(model)):
        raise LbdpoError(f"trainer.logps_chunk_size={chunk_size}: {type(model).__name__} cannot score from chunks of "
                         f"its last hidden state ({why}); set trainer.logps_chunk_size=null")
    # a GPU plans its attention kernels, and torch.compile its graphs (flex's kernel too), per shape: there the rows of
    # block_mask and flex take few shapes (a little more padding; also after a fall-back from segments); on the CPU
    # without compile, none
    bucket = forward == "packed" and (torch.device(device).type != "cpu" or compiled)
    return ForwardPlan(forward, layout, chunk_size, int(pad_to_multiple_of) if pad_to_multiple_of else None, bucket)


def check_flex(model, on_cpu: bool, compiled: bool) -> None:
    """Refuse ``trainer.packed_attention=flex`` where ``model`` cannot run it (an :class:`LbdpoError` naming the option
    and what to set instead: :func:`lbdpo.packed_flex.flex_unsupported`, or torch.compile on the CPU); one log line
    where it runs on the CPU, as torch's unfused reference."""
    why = flex_unsupported(model)
    if not why and on_cpu and compiled:
        why = "torch.compile would lower FlexAttention to inductor's CPU kernel, which has no backward"
    if why:
        raise LbdpoError(f"trainer.packed_attention=flex: {type(model).__name__} cannot run FlexAttention ({why}); "
                         "set trainer.packed_attention=block_mask (or auto)")
    if on_cpu:
        log.info("trainer.packed_attention=flex on the CPU: torch's unfused FlexAttention (exact, not fast; "
                 "segments is the CPU's packed attention)")


def hidden_at_prompt_end(last_hidden: torch.Tensor, attention_mask: torch.Tensor,
                         prompt_lengths: torch.Tensor) -> torch.Tensor:
    """h: the last-layer hidden state at each row's last prompt token. (B, T, H), (B, T), (B,) → (B, H)."""
    last = last_prompt_token_index(attention_mask, prompt_lengths)
    return last_hidden[torch.arange(len(last), device=last.device), last]


class Scorer:
    """Scores a model on collated rows the way its :class:`ForwardPlan` says (see the module docstring)."""

    def __init__(self, plan: ForwardPlan):
        self.plan = plan

    def token_logps(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    prompt_lengths: torch.Tensor, score_prompt: bool = True):
        """Token log-probs (N, T − 1) float32 and h (B, H) at the first B rows' last prompt token (None without
        ``score_prompt``), B = len(prompt_lengths).

        Rows (N = 2B pairs' rows, or N = B prompt rows): every position with full logits; with chunks, only the
        scored ones (responses of all rows and, with ``score_prompt``, the prompt tokens of the first B rows that
        log PPL(x) averages; 0 elsewhere). Packed (N = 2B): each pair one segment, the same scored positions.
        """
        plan = self.plan
        if plan.forward == "packed":
            packed = flex_pair_token_logps if plan.packed_attention == "flex" else packed_pair_token_logps
            return packed(model, input_ids, attention_mask, prompt_lengths, plan.chunk_size, score_prompt=score_prompt,
                          multiple_of=plan.pad_to_multiple_of, per_segment=plan.packed_attention == "segments",
                          bucketed=plan.bucket_shapes)
        n = prompt_lengths.shape[0]
        if not plan.chunk_size:
            out = forward_model(model, input_ids, attention_mask, output_hidden_states=score_prompt)
            token_lp, hidden = token_logps(out.logits, input_ids), out.hidden_states[-1] if score_prompt else None
        else:
            kind = row_mask_kind(model)  # the decoder's mask as forward_model gives it: 4D, built on the device
            mask = attention_mask if kind is None else row_attention_mask(
                attention_mask, model.get_input_embeddings().weight.dtype if kind == "additive" else None)
            hidden, lm_head = decoder_hidden_and_head(model, input_ids, mask, position_ids_from_mask(attention_mask))
            scored = labels[:, 1:] != IGNORE_INDEX
            if score_prompt:
                scored[:n] |= prompt_ppl_mask(attention_mask[:n], prompt_lengths)[:, 1:]
            token_lp = chunked_token_logps(hidden, input_ids, lm_head, scored, plan.chunk_size)
        if not score_prompt:
            return token_lp, None
        return token_lp, hidden_at_prompt_end(hidden[:n], attention_mask[:n], prompt_lengths)

    def response_logps(self, model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log π(y | x) (2B,) of every row of a collated batch under ``model`` (e.g. the reference)."""
        input_ids = batch["input_ids"]
        token_lp, _ = self.token_logps(model, input_ids, batch["attention_mask"], batch["labels"],
                                       batch["prompt_lengths"].to(input_ids.device), score_prompt=False)
        return response_logps(token_lp, batch["labels"])

    def prompt_logps(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Token log-probs (B, T − 1) and h (B, H) at the last real token of B prompt-only rows (any padding side),
        from one rows forward (a prompt is no pair: the packed path does not apply). Each row needs ≥ 2 tokens."""
        lengths = attention_mask.long().sum(-1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        rows = Scorer(ForwardPlan("rows", None, self.plan.chunk_size))
        return rows.token_logps(model, input_ids, attention_mask, labels, lengths)
