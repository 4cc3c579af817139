"""The policy forward of a preference batch with each prompt computed once, not once per response.

A batch holds 2B rows, prompt + chosen and prompt + rejected, so the standard forward computes every prompt
twice (prompts are ~70 % of the tokens on HH and on the sentiment set). Here:

1. the B prompts run through the decoder once, left-padded so that they all end in the last column, keeping
   their keys/values (a ``DynamicCache``) and hidden states;
2. the cache is repeated for the two responses of each pair (rows 0..B−1 chosen, B..2B−1 rejected) and the
   2B responses, right-padded, run on top of it, their positions continuing from their prompt's length.
   Gradients flow through the cache into the prompt pass.

The hidden state that predicts a token is then read from the prompt pass (prompt tokens, and the first
response token) or from the response pass (the other response tokens); log-probs are computed only for the
scored positions (every response token; the chosen rows' prompt tokens 2..m that log PPL(x) averages), in
chunks (:class:`lbdpo.chunked_logps.ChunkedTokenLogps`), and written into the standard (2B, T − 1) layout, so
the rest of the DPO forward is unchanged. h is the prompt pass's hidden state at the prompt's last token.
"""

from __future__ import annotations

import torch

from .chunked_logps import ChunkedTokenLogps
from .data.collator import pad_rows
from .logprobs import position_ids_from_mask


def shared_prompt_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              prompt_lengths: torch.Tensor, chunk_size: int, pad_token_id: int = 0,
                              score_prompt: bool = True):
    """Token log-probs (2B, T − 1) float32 (0 off the scored positions) and h (B, H), prompts computed once.

    Args:
        model: a causal LM with ``get_decoder()`` and a Linear ``get_output_embeddings()`` (see
            :func:`lbdpo.chunked_logps.chunking_unsupported`).
        input_ids, attention_mask: (2B, T), the batch contract of :mod:`lbdpo.dpo_model` (any padding side).
        prompt_lengths: (B,) prompt tokens of each pair.
        chunk_size: positions per lm_head chunk.
        score_prompt: also the chosen rows' prompt tokens (log PPL(x)); False for a reference.
    """
    from transformers import DynamicCache

    n, device = prompt_lengths.shape[0], input_ids.device
    lengths = prompt_lengths.tolist()
    rows = [input_ids[r][attention_mask[r].bool()] for r in range(2 * n)]  # each row's real tokens
    prompt_ids, prompt_mask = pad_rows([rows[i][:lengths[i]] for i in range(n)], pad_token_id, "left")
    response_ids, response_mask = pad_rows([rows[r][lengths[r % n]:] for r in range(2 * n)], pad_token_id, "right")
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    response_ids, response_mask = response_ids.to(device), response_mask.to(device)
    decoder = model.get_decoder()

    prompt_out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=position_ids_from_mask(prompt_mask), past_key_values=DynamicCache(),
                         use_cache=True)
    prompt_hidden = prompt_out.last_hidden_state  # (B, Tp, H)
    cache = prompt_out.past_key_values
    cache.reorder_cache(torch.cat([torch.arange(n, device=device)] * 2))  # prompt i serves rows i and i + B
    row_prompt_len = prompt_lengths.to(device).repeat(2)
    response_positions = row_prompt_len[:, None] + torch.arange(response_ids.shape[1], device=device)
    response_hidden = decoder(input_ids=response_ids, attention_mask=torch.cat([prompt_mask.repeat(2, 1), response_mask], 1),
                              position_ids=response_positions, past_key_values=cache, use_cache=True).last_hidden_state

    hidden, entries = _scored_positions(attention_mask, lengths, prompt_hidden, response_hidden, score_prompt)
    head = model.get_output_embeddings()
    logps = ChunkedTokenLogps.apply(hidden, head.weight, head.bias, input_ids[entries[0], entries[1] + 1], chunk_size)
    token_lp = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float32, device=device)
    return token_lp.index_put(entries, logps), prompt_hidden[:, -1]


def _scored_positions(attention_mask: torch.Tensor, lengths: list[int], prompt_hidden: torch.Tensor,
                      response_hidden: torch.Tensor, score_prompt: bool = True):
    """The predicting hidden states (M, H) of the scored tokens and their (row, column − 1) entries in the
    (2B, T − 1) layout: every response token of every row, and (``score_prompt``) prompt tokens 2..m of the
    chosen rows."""
    n, tp = len(lengths), prompt_hidden.shape[1]
    from_prompt: tuple[list[int], list[int]] = ([], [])  # (pair, column in the prompt pass)
    from_response: tuple[list[int], list[int]] = ([], [])  # (row, column in the response pass)
    entries_p: tuple[list[int], list[int]] = ([], [])
    entries_r: tuple[list[int], list[int]] = ([], [])
    for r in range(2 * n):
        cols = attention_mask[r].nonzero().squeeze(-1).tolist()  # columns of the row's real tokens
        pl = lengths[r % n]
        for q in range(1 if r < n and score_prompt else pl, len(cols)):  # the token at real position q, predicted by q − 1
            if q <= pl:  # its predictor (real position q − 1) is a prompt token: read from the prompt pass
                from_prompt[0].append(r % n)
                from_prompt[1].append(tp - pl + q - 1)
                entries_p[0].append(r)
                entries_p[1].append(cols[q] - 1)
            else:
                from_response[0].append(r)
                from_response[1].append(q - pl - 1)
                entries_r[0].append(r)
                entries_r[1].append(cols[q] - 1)
    device = prompt_hidden.device

    def index(pair: tuple[list[int], list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor(x, dtype=torch.long, device=device) for x in pair)

    hidden = torch.cat([prompt_hidden[index(from_prompt)], response_hidden[index(from_response)]])
    entries = tuple(torch.tensor(a + b, dtype=torch.long, device=device) for a, b in zip(entries_p, entries_r))
    return hidden, entries
