"""Token log-probabilities straight from the last hidden state, without a vocabulary-sized logits tensor.

A causal LM's ``forward`` returns logits (N, T, V) for every position; for DPO only the log-prob of the next
token at the scored positions is needed:

    log p(x_t | x_<t) = h_{t−1} · W[x_t] + b[x_t] − logsumexp_v (h_{t−1} · W[v] + b[v])

:class:`ChunkedTokenLogps` computes it for M selected positions, ``chunk_size`` positions at a time (lm_head
matmul, logsumexp and gather per chunk, in float32), and recomputes each chunk's logits in the backward pass
(∂/∂z_v = 1[v = x_t] − softmax(z)_v), so at most one (chunk_size, V) float32 block exists at a time instead of
(N, T, V) logits and their gradient. This is what Liger-Kernel's fused losses do for a scalar β; here it only
produces log-probs, so the per-pair β, log PPL and h of Learnable-β DPO stay where they are.

Precision: the lm_head products run as the surrounding autocast says, in the forward and in the backward alike
(the backward of a custom autograd function runs outside autocast unless told: the forward's autocast state is
restored there), so under ``trainer.mixed_precision=bf16`` both run in bf16 like the full lm_head would; softmax,
logsumexp and the log-probs stay float32. Without autocast (the CPU default, the exactness tests) all is float32.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)
# config keys of architectures whose logits are not plain lm_head(h): the chunked path would be wrong for them
LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class ChunkedTokenLogps(torch.autograd.Function):
    """log p of ``targets`` under logits = hidden @ weightᵀ (+ bias), chunk by chunk, recomputed in backward.

    Args (forward):
        hidden: (M, H) the last hidden state at the positions that predict the targets.
        weight: (V, H) the output embedding (lm_head) weight; bias: (V,) or None.
        targets: (M,) long token ids.
        chunk_size: positions per chunk.

    Returns:
        (M,) float32 log-probabilities.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int):
        ctx.autocast = autocast_state(hidden.device.type)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            logits = _logits(hidden[start:start + chunk_size], weight, bias)
            picked = logits.gather(-1, targets[start:start + chunk_size, None]).squeeze(-1)
            out[start:start + chunk_size] = picked - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        # Positions whose log-prob gets no gradient (e.g. the prompt tokens of a detached log PPL) contribute
        # nothing: their logits are not recomputed.
        live = (grad_out != 0).nonzero().squeeze(-1)
        device_type, dtype = hidden.device.type, ctx.autocast
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            for start in range(0, live.shape[0], ctx.chunk_size):
                rows = live[start:start + ctx.chunk_size]
                g_out = grad_out[rows].float()
                # ∂ log p / ∂ logits = onehot(target) − softmax(logits), scaled by the incoming gradient
                grad_logits = -torch.softmax(_logits(hidden[rows], weight, bias), dim=-1) * g_out[:, None]
                grad_logits.scatter_add_(-1, targets[rows, None], g_out[:, None])
                # the products in the autocast dtype when the forward ran under autocast, else in float32
                if need_h:
                    grad_h[rows] = (grad_logits @ (weight if dtype else weight.float())).to(hidden.dtype)
                if need_w:
                    grad_w += grad_logits.T @ (hidden[rows] if dtype else hidden[rows].float())
                if need_b:
                    grad_b += grad_logits.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def autocast_state(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type`` (None when autocast is off there)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:  # a device type autocast does not know
        return None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(m, H) → (m, V) float32 logits of one chunk (the matmul in the input dtype, as lm_head would do it)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.float()


def chunked_token_logps(last_hidden: torch.Tensor, input_ids: torch.Tensor, lm_head: torch.nn.Module,
                        scored: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Drop-in for :func:`lbdpo.logprobs.token_logps` that computes only the ``scored`` positions.

    Args:
        last_hidden: (N, T, H) the model's final hidden states (after its last norm: what lm_head reads).
        input_ids: (N, T).
        lm_head: the model's output embedding (``model.get_output_embeddings()``), a Linear.
        scored: (N, T − 1) bool, entry t − 1 ↔ token t: the positions whose log-prob is wanted.
        chunk_size: positions per chunk.

    Returns:
        (N, T − 1) float32: the log-prob of token t at entry t − 1 where ``scored``, 0 elsewhere.
    """
    rows, cols = scored.nonzero(as_tuple=True)
    hidden = last_hidden[:, :-1][rows, cols]  # (M, H): the position before each scored token predicts it
    targets = input_ids[:, 1:][rows, cols]
    picked = ChunkedTokenLogps.apply(hidden, lm_head.weight, lm_head.bias, targets, int(chunk_size))
    out = torch.zeros(scored.shape, dtype=torch.float32, device=last_hidden.device)
    return out.index_put((rows, cols), picked)


def chunking_unsupported(model) -> str | None:
    """Why :func:`chunked_token_logps` cannot stand in for ``model``'s logits (None when it can)."""
    config = getattr(model, "config", None)
    for key in LOGIT_TRANSFORM_KEYS:
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"its config sets {key}={getattr(config, key)} (logits are not plain lm_head(h))"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return f"its output embedding is {type(head).__name__}, not a Linear"
    if not hasattr(model, "get_decoder"):
        return "it has no get_decoder()"
    return None


def decoder_hidden_and_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
    """(last hidden state (N, T, H), lm_head) of a causal LM, running its decoder only (no logits)."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False)
    return out.last_hidden_state, model.get_output_embeddings()
