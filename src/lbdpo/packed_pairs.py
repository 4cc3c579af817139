"""The forward of a preference batch with each prompt computed once and no padding between pairs.

A collated batch holds 2B rows, prompt + chosen and prompt + rejected, padded to the longest row, so the
standard forward computes every prompt twice (~70 % of the tokens on HH and the sentiment set) and pads
every row to the longest. Here each pair becomes one segment

    [prompt (p tokens) | chosen (c) | rejected (r)]      positions 0..p−1 | p..p+c−1 | p..p+r−1

and a token attends to the earlier tokens of its own segment, except that rejected tokens do not see the
chosen ones (query q, key k: same pair, k ≤ q, and k is a prompt token or in q's own part). With the positions
above, every prompt and response token gets the hidden state it gets in its own unpadded row (the rule:
:func:`may_attend`). Two layouts, the same numbers (and the block mask's rows under FlexAttention,
:mod:`lbdpo.packed_flex`):

- block mask (``sdpa``/``eager`` attention): segments packed first-fit-decreasing into rows as long as the
  longest segment, one attention call over the rows under a 4D mask. Few kernels (the GPU default), but the
  rows' padding (16 % of positions on HH, ``benchmarks/packing_stats.py``) goes through every layer, and attention scores every (query, key)
  of a row, masked or not.
- per segment (:data:`SEGMENT_ATTENTION`, switched on by :func:`enable_segment_attention`; the CPU default): all
  segments back to back in one row, no padding; the linear layers see real tokens only, and attention runs
  once per segment under that segment's own mask (:func:`segment_attention`). A training step on HH on CPU
  1.19× faster than the block mask with a reference copy, 1.09× with it precomputed (``benchmarks/RESULTS.md``);
  a loop of small calls, so more kernel launches on a GPU.

Log-probs are then computed for the scored tokens only, from the hidden state that predicts each — the
previous token of its part, or the prompt's last token for a response's first token — in chunks of lm_head
(:class:`lbdpo.chunked_logps.ChunkedTokenLogps`, no vocabulary-sized tensor), and written into the standard
(2B, T − 1) layout, so the rest of the DPO forward is unchanged; h is the hidden state at the prompt's last
token. Needs a decoder that takes a custom 4D mask (``eager`` or ``sdpa`` attention, no sliding window):
:func:`packing_unsupported` says why not (:func:`lbdpo.scoring.plan_forward` refuses or, under ``auto``, takes rows).

Nothing happens at import: the attention function is registered with transformers, and a model switched to it, only
by :func:`enable_segment_attention` (or :func:`lbdpo.packed_flex.enable_flex_attention`; called where a packed scorer
is built); :func:`restore_attention` switches back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .chunked_logps import ChunkedTokenLogps
from .errors import LbdpoError, RunStateError

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # the part of a segment a token belongs to
SEGMENT_ATTENTION = "lbdpo_segments"  # sdpa, one call per packed segment (registered by enable_segment_attention)
FLEX_ATTENTION = "lbdpo_flex"  # FlexAttention under a BlockMask, else sdpa (lbdpo.packed_flex.enable_flex_attention)
SWITCHED = (SEGMENT_ATTENTION, FLEX_ATTENTION)  # lbdpo's attention functions: sdpa on every unpacked forward
MASK_ATTENTION = ("eager", "sdpa", *SWITCHED)  # implementations that apply a custom 4D mask as given


def may_attend(q_pair: torch.Tensor, k_pair: torch.Tensor, q_part: torch.Tensor, k_part: torch.Tensor,
               q_col: torch.Tensor, k_col: torch.Tensor) -> torch.Tensor:
    """The layout's one rule, elementwise (any broadcastable shapes): query q may attend to key k — same pair,
    k ≤ q (columns: a segment is contiguous), and k a prompt token or in q's own part — or k is q itself (so no
    query row is empty, padding's included). :func:`allowed_keys` (4D masks) and the FlexAttention ``mask_mod``
    (:func:`lbdpo.packed_flex.pair_block_mask`) both apply it."""
    return ((q_pair == k_pair) & (k_col <= q_col) & ((k_part == PROMPT) | (k_part == q_part))) | (q_col == k_col)


def allowed_keys(pair: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """(R, 1, C, C) bool from ``pair``, ``part`` (R, C): :func:`may_attend` for every (query, key) of a row;
    padding (pair −1) attends to earlier padding and itself."""
    cols = torch.arange(pair.shape[1], device=pair.device)
    allowed = may_attend(pair[:, :, None], pair[:, None, :], part[:, :, None], part[:, None, :], cols[:, None],
                         cols[None, :])
    return allowed[:, None]


@dataclass
class PackedPairs:
    """B pairs packed into R rows of C positions (segments [prompt | chosen | rejected], then padding).

    ``input_ids``, ``position_ids``, ``pair``, ``part``: (R, C) long; ``pair`` is −1 on padding.
    ``offsets``: (B, 2) long, the (row, column) where pair i's segment starts.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    pair: torch.Tensor
    part: torch.Tensor
    offsets: torch.Tensor

    def to(self, device: torch.device | str) -> "PackedPairs":
        """The same packing on ``device`` (five copies: the layout is built on the host, see below)."""
        return PackedPairs(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.position_ids, self.pair,
                                                                         self.part, self.offsets)))

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(R, 1, C, C): True (or 0.0) where query q may attend to key k, False (or the dtype's min) elsewhere.

        The rule of :func:`allowed_keys`. ``dtype`` None gives a bool mask (sdpa), a float dtype an additive one
        (eager).
        """
        allowed = allowed_keys(self.pair, self.part)
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def segments(self) -> list[tuple[int, int, torch.Tensor]]:
        """For a one-row packing: (start, end, (1, 1, L, L) bool mask) of each segment and of the trailing padding,
        in column order — the blocks of :meth:`attention_mask` off which every entry is False."""
        if self.pair.shape[0] != 1:
            raise LbdpoError(f"segments() needs a one-row packing, got {self.pair.shape[0]} rows")
        pair = self.pair[0].cpu()
        bounds = [0, *((pair[1:] != pair[:-1]).nonzero().squeeze(-1) + 1).tolist(), pair.shape[0]]
        return [(s, e, allowed_keys(self.pair[:, s:e], self.part[:, s:e])) for s, e in zip(bounds[:-1], bounds[1:])]


SMALLEST_WIDTH = 64  # the narrowest bucketed row


def width_bucket(n: int) -> int:
    """The smallest of 64·{1, 1.5, 2, 3, 4, 6, 8, …} (powers of two and 1.5 times them) that is ≥ ``n``: two
    widths an octave, so a row is less than 1.5× its longest segment (above 64)."""
    width = SMALLEST_WIDTH
    while True:
        for w in (width, width * 3 // 2):
            if w >= n:
                return w
        width *= 2


def pack_pairs(prompts: list[torch.Tensor], chosen: list[torch.Tensor], rejected: list[torch.Tensor],
               pad_token_id: int = 0, multiple_of: int | None = None, one_row: bool = False,
               bucketed: bool = False) -> PackedPairs:
    """Pack B pairs (1-D token tensors) into rows as long as the longest segment, first fit by decreasing length
    (``one_row``: all segments back to back in a single row, for :func:`segment_attention`).

    ``multiple_of`` rounds the row length up (``trainer.pad_to_multiple_of``): fewer distinct shapes for a GPU's
    per-shape kernel plans and compiled graphs; the extra columns are padding, which changes no number.
    ``bucketed`` (rows, not ``one_row``): the row length one of :func:`width_bucket`'s (then rounded to
    ``multiple_of``) and the number of rows a power of two (rows of padding added), so that an epoch's batches
    take a handful of (rows, width) shapes (6 on HH at 8 pairs, against 50: ``benchmarks/host_ops.py``).
    """
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    capacity = sum(lengths) if one_row else max(lengths)
    bucketed = bucketed and not one_row
    if bucketed:
        capacity = width_bucket(capacity)
    if multiple_of:
        capacity = -(-capacity // multiple_of) * multiple_of
    rows: list[int] = []  # free positions left in each row
    offsets = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(rows) if free >= lengths[i]), None)
        if row is None:
            rows.append(capacity)
            row = len(rows) - 1
        offsets[i] = (row, capacity - rows[row])
        rows[row] -= lengths[i]
    device = prompts[0].device
    shape = (1 << (len(rows) - 1).bit_length() if bucketed else len(rows), capacity)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long, device=device)
    position_ids = torch.zeros(shape, dtype=torch.long, device=device)
    pair = torch.full(shape, -1, dtype=torch.long, device=device)
    part = torch.zeros(shape, dtype=torch.long, device=device)
    for i, (row, col) in enumerate(offsets):
        p, c, r = len(prompts[i]), len(chosen[i]), len(rejected[i])
        seg = slice(col, col + p + c + r)
        input_ids[row, seg] = torch.cat([prompts[i], chosen[i], rejected[i]])
        position_ids[row, seg] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)]).to(device)
        pair[row, seg] = i
        part[row, seg] = torch.tensor([PROMPT] * p + [CHOSEN] * c + [REJECTED] * r, device=device)
    return PackedPairs(input_ids, position_ids, pair, part, torch.tensor(offsets, dtype=torch.long, device=device))


class Segments(list):
    """:meth:`PackedPairs.segments` of one packed forward, passed through the decoder's keyword arguments to
    :func:`segment_attention`; ``calls`` counts the attention calls that received it (a decoder that drops the
    keyword would attend across pairs: :func:`packed_pair_token_logps` checks)."""

    calls: int = 0


def segment_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, segments: Segments | None = None, **kwargs):
    """The attention of :data:`SEGMENT_ATTENTION`: with ``segments`` (passed by :func:`packed_pair_token_logps`
    through the decoder's keyword arguments), sdpa over each segment alone under its own mask; without (any other
    forward: unpacked rows, generation), sdpa itself.

    query (1, heads, C, D), key and value (1, kv_heads, C, D) → ((1, C, heads, D), None), as sdpa.
    """
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    segments.calls += 1
    outputs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], mask, **kwargs)[0]
               for s, e, mask in segments]
    return torch.cat(outputs, dim=1), None


def segment_attention_unsupported(model) -> str | None:
    """Why ``model`` cannot be switched to :data:`SEGMENT_ATTENTION` (None when it can or already is), short of
    trying: it must run sdpa and be able to pack (:func:`packing_unsupported`)."""
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn == SEGMENT_ATTENTION:
        return None
    if attn != "sdpa":
        return f"its attention implementation is {attn!r}, not 'sdpa'"
    return packing_unsupported(model)


def enable_segment_attention(model) -> str | None:
    """Switch ``model`` (a transformers causal LM, or a peft one) to :data:`SEGMENT_ATTENTION` through transformers'
    public ``set_attn_implementation`` (registering the function first, once), so its packed forwards run one row
    without padding. None when done (or already), else why not (the model is then left as it was).

    A change to the model the caller gave, for as long as it is scored packed: its other forwards (unpacked rows,
    generation) are sdpa's as before, and the name is not saved with its config; :func:`restore_attention` undoes it.
    """
    return segment_attention_unsupported(model) or switch_attention(model, SEGMENT_ATTENTION, segment_attention)


def switch_attention(model, name: str, function) -> str | None:
    """Register ``function`` as transformers' attention ``name`` (once; the masks of its unpacked forwards are sdpa's)
    and switch ``model`` (an sdpa model, or a peft one) to it through the public ``set_attn_implementation``. None
    when done, else why not (the model is then left on sdpa)."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the transformers model
    base.set_attn_implementation(name)  # warns and does nothing where the class cannot switch
    if base.config._attn_implementation != name:
        restore_attention(model)
        return f"{type(base).__name__} cannot switch its attention implementation (not on transformers' AttentionInterface)"
    return None


def restore_attention(model) -> None:
    """Undo :func:`enable_segment_attention` (or :func:`lbdpo.packed_flex.enable_flex_attention`): ``model`` back on
    sdpa (nothing when it is not switched)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) in SWITCHED:
        base.set_attn_implementation("sdpa")


def packing_unsupported(model) -> str | None:
    """Why ``model``'s decoder cannot run packed pairs (None when it can): it must apply a custom 4D mask."""
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn not in MASK_ATTENTION:
        return f"its attention implementation is {attn!r} (packing needs one of {MASK_ATTENTION})"
    return decoder_unsupported(model)


def decoder_unsupported(model) -> str | None:
    """Why ``model``'s decoder cannot take a mask of lbdpo's (None when it can), whatever its attention function: a
    sliding window would be dropped, remote code is untested."""
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) or ()
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        return "it uses sliding-window attention (a custom mask would drop the window)"
    if not type(model.get_decoder()).__module__.startswith("transformers."):
        return f"its decoder {type(model.get_decoder()).__name__} is remote code (custom 4D masks untested)"
    return None


def pair_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
                pad_token_id: int = 0, multiple_of: int | None = None, one_row: bool = False, bucketed: bool = False):
    """The host side of the packed forward: which token goes where. Per-pair Python bookkeeping, so done on host
    copies of the batch, read from the device at once (one transfer, one sync).

    Args: the batch contract's ``input_ids``, ``attention_mask`` (2B, T) and ``prompt_lengths`` (B,), on any device;
    the rest as :func:`pack_pairs`.

    Returns:
        (:class:`PackedPairs` on the host, the host copy of ``input_ids``, each row's real-token columns and its
        real tokens (2B 1-D tensors each), the prompt lengths as ints).
    """
    n, (n_rows, width) = prompt_lengths.shape[0], input_ids.shape
    flat = torch.cat([input_ids.reshape(-1), attention_mask.reshape(-1).to(input_ids.dtype),
                      prompt_lengths.to(device=input_ids.device, dtype=input_ids.dtype)]).cpu()  # the one read
    ids, mask, lengths = flat[:n_rows * width], flat[n_rows * width:2 * n_rows * width], flat[2 * n_rows * width:]
    ids, mask, lengths = ids.reshape(n_rows, width), mask.reshape(n_rows, width), lengths.tolist()
    cols = [mask[r].nonzero().squeeze(-1) for r in range(2 * n)]  # columns of each row's real tokens
    rows = [ids[r, cols[r]] for r in range(2 * n)]
    for i, p in enumerate(lengths):
        if not torch.equal(rows[i][:p], rows[n + i][:p]):
            raise LbdpoError(f"pair {i}: its chosen and rejected rows do not start with the same {p} prompt tokens")
    packed = pack_pairs([rows[i][:p] for i, p in enumerate(lengths)], [rows[i][p:] for i, p in enumerate(lengths)],
                        [rows[n + i][p:] for i, p in enumerate(lengths)], pad_token_id, multiple_of,
                        one_row=one_row, bucketed=bucketed)
    return packed, ids, cols, rows, lengths


def packed_pair_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            prompt_lengths: torch.Tensor, chunk_size: int, score_prompt: bool = True,
                            pad_token_id: int = 0, multiple_of: int | None = None, per_segment: bool = False,
                            bucketed: bool = False, mask_builder=None):
    """Token log-probs (2B, T − 1) float32 (0 off the scored positions) and h (B, H) (None without
    ``score_prompt``), each prompt computed once and no padding between pairs.

    Args:
        model: a causal LM with ``get_decoder()`` and a Linear ``get_output_embeddings()`` that passes
            :func:`packing_unsupported` and :func:`lbdpo.chunked_logps.chunking_unsupported`.
        input_ids, attention_mask: (2B, T), the batch contract of :mod:`lbdpo.dpo_model` (any padding side).
        prompt_lengths: (B,) prompt tokens of each pair (the same in its two rows).
        chunk_size: positions per lm_head chunk.
        score_prompt: also the prompt tokens 2..m that log PPL(x) averages (False for a reference).
        multiple_of: round the packed rows' length up to a multiple of this (:func:`pack_pairs`).
        per_segment: the layout: one row, attention per segment (the model must be switched by
            :func:`enable_segment_attention`); else rows under one block mask.
        bucketed: with the block mask, few distinct (rows, width) shapes (:func:`pack_pairs`); the same numbers.
        mask_builder: rows only: the decoder's ``attention_mask`` from the :class:`PackedPairs` on the device (e.g.
            :func:`lbdpo.packed_flex.pair_block_mask`); None: the 4D block mask (:meth:`PackedPairs.attention_mask`).
    """
    n, device = prompt_lengths.shape[0], input_ids.device
    attn = model.config._attn_implementation
    if per_segment and attn != SEGMENT_ATTENTION:
        raise RunStateError(f"{type(model).__name__} is not switched to per-segment attention (its implementation is "
                            f"{attn!r}): call lbdpo.packed_pairs.enable_segment_attention(model) first")
    # the layout on host copies: an accelerator sees one transfer in and a few index tensors out
    packed, ids, cols, rows, lengths = pair_layout(input_ids, attention_mask, prompt_lengths, pad_token_id, multiple_of,
                                                   one_row=per_segment, bucketed=bucketed)
    offsets, packed = packed.offsets, packed.to(device)
    if per_segment:  # the decoder builds (and segment_attention ignores) a mask of its own
        masks = {"attention_mask": None, "segments": Segments(packed.segments())}
    elif mask_builder is not None:
        masks = {"attention_mask": mask_builder(packed)}
    else:
        masks = {"attention_mask": packed.attention_mask(None if attn == "sdpa" else torch.float32)}
    hidden = model.get_decoder()(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                                 **masks).last_hidden_state  # (R, C, H)
    if per_segment and masks["segments"].calls == 0:
        raise RunStateError(f"{type(model).__name__}'s layers did not pass the packed segments to their attention "
                           "(its tokens would attend across pairs): set trainer.packed_attention=block_mask")
    width = hidden.shape[1]

    predictor, dest_row, dest_col = [], [], []  # flat packed index of the predicting position; (row, col − 1) entry
    for i, p in enumerate(lengths):  # host tensors
        start = int(offsets[i, 0]) * width + int(offsets[i, 1])
        c, r = len(rows[i]) - p, len(rows[n + i]) - p
        first = 1 if score_prompt else p  # the prompt's tokens 1..p−1 (log PPL), then the chosen response
        predictor += [start + torch.arange(first - 1, p + c - 1),  # the previous token
                      start + torch.cat([torch.tensor([p - 1]),  # rejected: the prompt's last, then
                                         torch.arange(p + c, p + c + r - 1)])]  # its previous token
        dest_row += [torch.full((p + c - first,), i), torch.full((r,), n + i)]
        dest_col += [cols[i][first:] - 1, cols[n + i][p:] - 1]
    predictor, dest_row, dest_col = torch.cat(predictor), torch.cat(dest_row), torch.cat(dest_col)
    targets = ids[dest_row, dest_col + 1].to(device, non_blocking=True)
    predictor, dest_row, dest_col = (t.to(device, non_blocking=True) for t in (predictor, dest_row, dest_col))
    head = model.get_output_embeddings()
    logps = ChunkedTokenLogps.apply(hidden.reshape(-1, hidden.shape[-1])[predictor], head.weight, head.bias,
                                    targets, chunk_size)
    token_lp = torch.zeros(2 * n, input_ids.shape[1] - 1, dtype=torch.float32, device=device)
    token_lp = token_lp.index_put((dest_row, dest_col), logps)
    if not score_prompt:
        return token_lp, None
    last = offsets[:, 0] * width + offsets[:, 1] + torch.tensor(lengths) - 1
    return token_lp, hidden.reshape(-1, hidden.shape[-1])[last.to(device)]
