"""Token log-probabilities, the masks that select prompt and response tokens, and the plain full-logits scoring of
padded rows (:func:`sequence_log_ppl`). Training and evaluation score preference batches and generated samples
through :class:`lbdpo.scoring.Scorer` (rows or packed), which builds on these.

Every function here works for left padding, right padding and rows of unequal length: positions are
identified through ``attention_mask`` (1 = real token), never through raw indices.

Shift convention (causal LM): logits at position t predict the token at position t + 1, so the
log-prob of token t (t ≥ 1) is read from logits[t − 1]. Token 0 of a row (its first real token) has no
prediction and never counts.

The checks of a batch here (:func:`check`) read a tensor; on an accelerator each read stalls the host until the device
is done. Inside :class:`DeferredChecks` (the trainer's step) they are recorded instead and read with the step's
other values, then raise the same one-line error. For the same reason :func:`forward_model` hands a decoder that
applies a custom 4D mask one built on the device (:func:`row_attention_mask`): from a 2D mask, transformers' sdpa path
reads the mask on the host (``fast_all(padding_mask)``) to decide whether it can skip it, once per forward.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch

from .data.collator import IGNORE_INDEX  # the batch contract: labels are −100 off the response
from .errors import LbdpoError
from .packed_pairs import packing_unsupported  # the one rule for "applies a custom 4D mask as given"


_pending = threading.local()  # .checks: the DeferredChecks in force on this thread, if any


class DeferredChecks:
    """Batch checks that read a device tensor, deferred: inside ``with checks:`` :func:`check` records its condition
    (a 0-dim bool tensor: no device read) instead of raising at once; the owner reads :meth:`flags` together with
    whatever else it reads (the trainer: its one read a step) and calls :meth:`raise_failed`, which raises the
    :class:`LbdpoError` the check would have raised. Reentrant (entered once per micro-batch); outside it every
    check reads and raises at once."""

    def __init__(self):
        self.failed: dict[str, torch.Tensor] = {}  # message → whether it failed in any recorded call (0-dim bool)
        self._outer: list[DeferredChecks | None] = []

    def __enter__(self) -> "DeferredChecks":
        self._outer.append(getattr(_pending, "checks", None))
        _pending.checks = self
        return self

    def __exit__(self, *exc) -> None:
        _pending.checks = self._outer.pop()

    def __len__(self) -> int:
        return len(self.failed)

    def record(self, failed: torch.Tensor, message: str) -> None:
        seen = self.failed.get(message)
        self.failed[message] = failed if seen is None else seen | failed

    def flags(self, device: torch.device | str) -> torch.Tensor:
        """(K,) float32 on ``device``: 1 where check k failed, in the order the checks first ran (K = len(self))."""
        if not self.failed:
            return torch.zeros(0, device=device)
        return torch.stack(list(self.failed.values())).to(device=device, dtype=torch.float32)

    def raise_failed(self, flags) -> None:
        """Raise the :class:`LbdpoError` of the first check whose entry of ``flags`` (:meth:`flags` as read, or
        summed over processes) is > 0; nothing when none is."""
        for message, value in zip(self.failed, flags):
            if value > 0:
                raise LbdpoError(message)


def check(failed: torch.Tensor, message: str) -> None:
    """``LbdpoError(message)`` where the 0-dim bool ``failed`` holds: at once, or, inside :class:`DeferredChecks`,
    when its owner reads the recorded flags."""
    deferred = getattr(_pending, "checks", None)
    if deferred is not None:
        deferred.record(failed, message)
    elif bool(failed):
        raise LbdpoError(message)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (0 at each row's first real token), so that a left-padded
    row is encoded exactly like the same row without padding. (N, T) → (N, T) long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


_ROW_MASK_KINDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → (attention impl., its mask kind)


def row_mask_kind(model) -> str | None:
    """Which mask :func:`forward_model` gives ``model``: ``"bool"`` (sdpa, and lbdpo's per-segment sdpa, which runs
    plain sdpa on unpacked rows) or ``"additive"`` (eager) — a 4D mask from :func:`row_attention_mask` — where its
    decoder applies a custom 4D mask as given: sdpa or eager attention, no sliding window, a decoder of transformers
    itself (Llama, Qwen2, … : their ``create_causal_mask`` returns a 4D mask as it is). The rule is packed pairs'
    (:func:`lbdpo.packed_pairs.packing_unsupported`). None elsewhere (flash-attention and flex build their own masks,
    a sliding window would be dropped, remote code such as InternLM2 may reject a 4D mask): the 2D padding mask,
    as before. Decided once per model (again if its attention implementation is switched)."""
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    known = None
    with contextlib.suppress(TypeError):  # a model that cannot be weakly referenced is decided at every call
        known = _ROW_MASK_KINDS.get(model)
    if known is None or known[0] != attn:
        known = (attn, None if packing_unsupported(model) else "additive" if attn == "eager" else "bool")
        with contextlib.suppress(TypeError):
            _ROW_MASK_KINDS[model] = known
    return known[1]


def row_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 4D attention mask of padded rows, built on their device without reading it: query q attends to key k where
    k ≤ q and k is a real token (causal ∧ key-is-real: what transformers builds from the 2D mask), and every query to
    itself, so that no query row is empty (a padded query before a left-padded row's first real token has no key
    left: sdpa would give NaN there; a padded position's output is never read).

    Args:
        attention_mask: (N, T), 1 on real tokens (any padding side).
        dtype: None → bool, True = attend (sdpa); a float dtype → additive, 0 or the dtype's min (eager).

    Returns:
        (N, 1, T, T). N·T² entries, as transformers' own mask of padded rows: 32 MiB in bool at 32 rows × 1024
        tokens (64 MiB additive in bf16, 128 MiB in float32).
    """
    t = attention_mask.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()  # [q, k]: k ≤ q
    allowed = causal & attention_mask.bool()[:, None, None, :]  # (N, 1, T, T)
    allowed |= torch.eye(t, dtype=torch.bool, device=attention_mask.device)
    if dtype is None:
        return allowed
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), torch.finfo(dtype).min)


def forward_model(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False):
    """One forward of a HF causal LM over a padded batch (any padding side), positions from the mask; the mask as
    :func:`row_mask_kind` decides (4D, built on the device, or the 2D mask itself): the same logits at every real
    position.

    Args:
        model: a causal LM (or a peft-wrapped one); input_ids, attention_mask: (N, T).

    Returns:
        the model's output (``logits`` (N, T, V); ``hidden_states`` when asked).
    """
    kind = row_mask_kind(model)
    mask = attention_mask if kind is None else row_attention_mask(
        attention_mask, model.get_input_embeddings().weight.dtype if kind == "additive" else None)
    return model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=output_hidden_states,
        use_cache=False,
    )


def sequence_log_ppl(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log PPL of each whole row under ``model``: the mean NLL of every real token but the first.

    Args:
        input_ids, attention_mask: (N, T), any padding side.

    Returns:
        (N,) float32. Follows the ambient grad mode.
    """
    logits = forward_model(model, input_ids, attention_mask).logits
    return masked_mean_nll(token_logps(logits, input_ids), sequence_ppl_mask(attention_mask))


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, <t]) for t = 1..T−1, computed in float32.

    Uses log p = logit[token] − logsumexp(logits) so no second (N, T, V) log-softmax tensor is built.

    Args:
        logits: (N, T, V) model outputs (any float dtype).
        input_ids: (N, T) token ids.

    Returns:
        (N, T − 1) float32: entry t − 1 is the log-prob of token t.
    """
    logits = logits[:, :-1, :]
    targets = input_ids[:, 1:].unsqueeze(-1)
    picked = torch.gather(logits, -1, targets).squeeze(-1).float()
    # logsumexp in float32; for a low-precision input one row at a time, so that at most one float32
    # (T, V) copy of a row exists besides the input.
    if logits.dtype == torch.float32:
        normaliser = torch.logsumexp(logits, dim=-1)
    else:
        normaliser = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    return picked - normaliser


def real_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each position among the real tokens of its row; −1 on padding.

    Args:
        attention_mask: (N, T) with 1 on real tokens (any padding side).

    Returns:
        (N, T) long: 0 for the first real token, 1 for the second, …, −1 at padded positions.
    """
    mask = attention_mask.long()
    return torch.where(mask.bool(), mask.cumsum(dim=-1) - 1, torch.full_like(mask, -1))


def prompt_ppl_mask(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """Mask of the prompt tokens scored by the prompt's perplexity: real positions 1 … prompt_length − 1.

    The prompt's first token is excluded because nothing predicts it; a prompt of m tokens therefore has
    m − 1 scored tokens, and log PPL(x) = −(1/(m−1)) Σ_{i=2..m} log πθ(x_i | x_<i).

    Args:
        attention_mask: (N, T).
        prompt_lengths: (N,).

    Returns:
        (N, T) bool.
    """
    pos = real_token_positions(attention_mask)
    return (pos >= 1) & (pos < prompt_lengths.to(pos.device).unsqueeze(-1))


def last_prompt_token_index(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """Column index of each row's last prompt token (the position whose hidden state feeds the BetaHead).

    Args:
        attention_mask: (N, T).
        prompt_lengths: (N,) ≥ 1.

    Returns:
        (N,) long column indices.
    """
    pos = real_token_positions(attention_mask)
    hit = pos == (prompt_lengths.to(pos.device).unsqueeze(-1) - 1)
    check((~hit.any(dim=-1)).any(), "a row has prompt_length larger than its number of real tokens (or < 1)")
    return hit.long().argmax(dim=-1)


def masked_mean_nll(token_lp: torch.Tensor, predicted_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the selected predicted tokens of each row (= log PPL).

    Args:
        token_lp: (N, T − 1) from :func:`token_logps` (entry t − 1 ↔ token t).
        predicted_mask: (N, T) bool over *tokens*; it must not select a row's first real token (nothing
            predicts it): build it with :func:`prompt_ppl_mask` or :func:`sequence_ppl_mask`.

    Returns:
        (N,) float32 mean NLL. An :class:`LbdpoError` (:func:`check`) when a row selects no predicted token.
    """
    mask = predicted_mask[:, 1:].to(token_lp.dtype)
    counts = mask.sum(dim=-1)
    check((counts == 0).any(), "perplexity needs at least two tokens per sequence (one predicted token)")
    return -(token_lp * mask).sum(dim=-1) / counts


def sequence_ppl_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Mask of the tokens scored by perplexity: every real token except the row's first.

    Args:
        attention_mask: (N, T).

    Returns:
        (N, T) bool.
    """
    return real_token_positions(attention_mask) >= 1


def response_logps(token_lp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the response tokens, i.e. those whose label is not −100.

    Args:
        token_lp: (N, T − 1) from :func:`token_logps` computed on ``input_ids``.
        labels: (N, T) equal to ``input_ids`` on response tokens and −100 on prompt and padding.

    Returns:
        (N,) float32 log π(y | x).
    """
    mask = (labels[:, 1:] != IGNORE_INDEX).to(token_lp.dtype)
    return (token_lp * mask).sum(dim=-1)
