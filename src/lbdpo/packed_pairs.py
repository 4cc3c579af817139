"""The forward of a preference batch with each prompt computed once and no padding between pairs.

A collated batch holds 2B rows, prompt + chosen and prompt + rejected, padded to the longest row, so the
standard forward computes every prompt twice (~70 % of the tokens on HH and the sentiment set) and pads
every row to the longest. Here each pair becomes one segment

    [prompt (p tokens) | chosen (c) | rejected (r)]      positions 0..p−1 | p..p+c−1 | p..p+r−1

and the segments are packed first-fit-decreasing into rows as long as the longest segment. One 4D attention
mask makes this exactly the standard computation: a token attends to the earlier tokens of its own segment,
except that rejected tokens do not see the chosen ones (query q, key k: same pair, k ≤ q, and k is a prompt
token or in q's own part). With the positions above, every prompt and response token gets the hidden state it
gets in its own unpadded row.

Log-probs are then computed for the scored tokens only, from the hidden state that predicts each — the
previous token of its part, or the prompt's last token for a response's first token — in chunks of lm_head
(:class:`lbdpo.chunked_logps.ChunkedTokenLogps`, no vocabulary-sized tensor), and written into the standard
(2B, T − 1) layout, so the rest of the DPO forward is unchanged; h is the hidden state at the prompt's last
token. Needs a decoder that takes a custom 4D mask (``eager`` or ``sdpa`` attention, no sliding window):
:func:`packing_unsupported` says why not, and the caller falls back to one row per response.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunked_logps import ChunkedTokenLogps

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # the part of a segment a token belongs to
MASK_ATTENTION = ("eager", "sdpa")  # attention implementations that apply a custom 4D mask as given


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

        Same pair, k ≤ q, and k a prompt token or in q's own part; padding attends to itself only (so no
        query row is empty). ``dtype`` None gives a bool mask (sdpa), a float dtype an additive one (eager).
        """
        c = self.pair.shape[1]
        q_pair, k_pair = self.pair[:, :, None], self.pair[:, None, :]
        q_part, k_part = self.part[:, :, None], self.part[:, None, :]
        causal = torch.ones(c, c, dtype=torch.bool, device=self.pair.device).tril()
        allowed = (q_pair == k_pair) & causal & ((k_part == PROMPT) | (k_part == q_part))
        allowed |= torch.eye(c, dtype=torch.bool, device=self.pair.device)
        allowed = allowed[:, None]
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)


def pack_pairs(prompts: list[torch.Tensor], chosen: list[torch.Tensor], rejected: list[torch.Tensor],
               pad_token_id: int = 0, multiple_of: int | None = None) -> PackedPairs:
    """Pack B pairs (1-D token tensors) into rows as long as the longest segment, first fit by decreasing length.

    ``multiple_of`` rounds the row length up (``trainer.pad_to_multiple_of``): fewer distinct shapes for a GPU's
    per-shape kernel plans and compiled graphs; the extra columns are padding, which changes no number.
    """
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    capacity = max(lengths)
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
    shape = (len(rows), capacity)
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


def packing_unsupported(model) -> str | None:
    """Why ``model``'s decoder cannot run packed pairs (None when it can): it must apply a custom 4D mask."""
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if attn not in MASK_ATTENTION:
        return f"its attention implementation is {attn!r} (packing needs one of {MASK_ATTENTION})"
    layer_types = getattr(config, "layer_types", None) or ()
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        return "it uses sliding-window attention (a custom mask would drop the window)"
    if not type(model.get_decoder()).__module__.startswith("transformers."):
        return f"its decoder {type(model.get_decoder()).__name__} is remote code (custom 4D masks untested)"
    return None


def packed_pair_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            prompt_lengths: torch.Tensor, chunk_size: int, score_prompt: bool = True,
                            pad_token_id: int = 0, multiple_of: int | None = None):
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
    """
    n, device = prompt_lengths.shape[0], input_ids.device
    # The layout (which token goes where) is per-pair Python bookkeeping: done on host copies, so an accelerator
    # sees one transfer in and a few index tensors out instead of hundreds of tiny kernels and syncs.
    ids, mask, lengths = input_ids.cpu(), attention_mask.cpu(), prompt_lengths.tolist()
    cols = [mask[r].nonzero().squeeze(-1) for r in range(2 * n)]  # columns of each row's real tokens
    rows = [ids[r, cols[r]] for r in range(2 * n)]
    for i, p in enumerate(lengths):
        if not torch.equal(rows[i][:p], rows[n + i][:p]):
            raise ValueError(f"pair {i}: its chosen and rejected rows do not start with the same {p} prompt tokens")
    packed = pack_pairs([rows[i][:p] for i, p in enumerate(lengths)], [rows[i][p:] for i, p in enumerate(lengths)],
                        [rows[n + i][p:] for i, p in enumerate(lengths)], pad_token_id, multiple_of)  # on the host
    offsets, packed = packed.offsets, packed.to(device)
    dtype = None if model.config._attn_implementation == "sdpa" else torch.float32
    hidden = model.get_decoder()(input_ids=packed.input_ids, attention_mask=packed.attention_mask(dtype),
                                 position_ids=packed.position_ids, use_cache=False).last_hidden_state  # (R, C, H)
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
