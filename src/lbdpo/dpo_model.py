"""DynamicBetaDPOModel: a policy, its BetaHead and a reference, computing the Learnable-β DPO loss.

Batch contract (what :meth:`DynamicBetaDPOModel.forward` takes; built by :mod:`lbdpo.data.collator`):

    input_ids       (2B, T) long   rows 0..B−1 = prompt + chosen, rows B..2B−1 = prompt + rejected
    attention_mask  (2B, T) long   1 on real tokens; left or right padding both work
    labels          (2B, T) long   = input_ids on response tokens, −100 on prompt and padding
    prompt_lengths  (B,)    long   number of prompt tokens (≥ 2) of pair i, same in both of its rows
    reference_chosen_logps, reference_rejected_logps   (B,) float, optional: precomputed
                                   log πref(y|x); used instead of running the reference model

One policy forward gives everything: the summed response log-probs (labels), the prompt's log PPL (its
positions are independent of the response under causal attention, so this is exact), and the last-layer hidden
state at the prompt's last token. With ``pack_pairs`` (the trainer's default) that forward runs each pair as one
packed segment, prompt once (:mod:`lbdpo.packed_pairs`); otherwise over the 2B padded rows. Both give the same
values and gradients (tests against one sequence at a time).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn as nn

from .chunked_logps import chunked_token_logps, chunking_unsupported, decoder_hidden_and_head
from .data.collator import IGNORE_INDEX
from .logprobs import (
    forward_model,
    last_prompt_token_index,
    masked_mean_nll,
    position_ids_from_mask,
    prompt_ppl_mask,
    response_logps,
    sequence_logps,
    token_logps,
)
from .losses import dpo_loss, logratio_margin
from .metrics import preference_metrics
from .packed_pairs import SEGMENT_ATTENTION, packed_pair_token_logps, packing_unsupported, use_segment_attention

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # only for annotations: beta_head re-exports this module's class, so no runtime import back
    from .beta_head import BetaHead


@dataclass
class PromptStats:
    """β and its inputs for a batch of prompts, read from one policy forward; all (B,) but ``hidden`` (B, H)."""

    beta: torch.Tensor  # β(x)
    log_ppl: torch.Tensor  # log PPL(x) under the policy
    hidden: torch.Tensor  # h: last-layer hidden state at the prompt's last token
    f: torch.Tensor  # the head's context factor f(h)
    log_ppl_approx: torch.Tensor | None = None  # the head's approximation of log PPL (use_ppl_approx)
    beta_exact: torch.Tensor | None = None  # β from the exact log PPL, when β used the approximation


def hidden_at_prompt_end(last_hidden: torch.Tensor, attention_mask: torch.Tensor,
                         prompt_lengths: torch.Tensor) -> torch.Tensor:
    """h: the last-layer hidden state at each row's last prompt token. (B, T, H), (B, T), (B,) → (B, H)."""
    last = last_prompt_token_index(attention_mask, prompt_lengths)
    return last_hidden[torch.arange(len(last), device=last.device), last]


def prompt_stats(beta_head: "BetaHead", token_lp: torch.Tensor, h: torch.Tensor, attention_mask: torch.Tensor,
                 prompt_lengths: torch.Tensor) -> PromptStats:
    """β(x), log PPL(x) and f of each row's prompt, from a forward over prompt (+ response) rows and its h.

    Causal attention makes a prompt's positions independent of what follows it, so reading them from a
    prompt + response row is exact. The one implementation, used by training and by the model API.

    Args:
        beta_head: the β module; token_lp: (B, T − 1) from :func:`lbdpo.logprobs.token_logps`;
        h: (B, H) from :func:`hidden_at_prompt_end`; attention_mask: (B, T); prompt_lengths: (B,) (≥ 2 each).
    """
    log_ppl = masked_mean_nll(token_lp, prompt_ppl_mask(attention_mask, prompt_lengths))
    beta, details = beta_head(h, log_ppl=log_ppl, return_details=True)  # β(x) = w · T(PPL) · f(h)
    return PromptStats(beta=beta, log_ppl=log_ppl, hidden=h, f=details["f"],
                       log_ppl_approx=details.get("log_ppl_approx"), beta_exact=details.get("beta_exact"))


# The per-pair (B,) tensors of a DPOOutput: what the trainer gathers across processes and evaluation collects.
PER_PAIR_KEYS = (
    "losses", "beta", "log_ppl", "f", "policy_chosen_logps", "policy_rejected_logps",
    "reference_chosen_logps", "reference_rejected_logps", "chosen_rewards", "rejected_rewards",
    "log_ppl_approx", "beta_exact",  # only with beta_head.use_ppl_approx
    "kept",  # only with beta_head=beta_dpo: 1 for the pairs its filtering kept in the loss
)


@dataclass
class DPOOutput:
    """Result of :meth:`DynamicBetaDPOModel.forward`; per-pair tensors are (B,)."""

    loss: torch.Tensor  # scalar: mean DPO loss + the BetaHead's regulariser and auxiliary (ppl_approx) loss
    losses: torch.Tensor  # per-pair DPO loss
    beta: torch.Tensor  # β(x) used for each pair (carries gradient to the head)
    log_ppl: torch.Tensor  # prompt log PPL under the policy
    f: torch.Tensor  # the head's context factor f(h)
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    reference_chosen_logps: torch.Tensor
    reference_rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor  # β·(log πθ − log πref)(yw|x), detached
    rejected_rewards: torch.Tensor
    w: torch.Tensor  # the head's current w (detached scalar)
    log_ppl_approx: torch.Tensor | None = None  # see PromptStats
    beta_exact: torch.Tensor | None = None
    kept: torch.Tensor | None = None  # β-DPO: 1 for the pairs the loss averages (its filtering), else 0

    @functools.cached_property
    def metrics(self) -> dict[str, float]:
        """Scalar metrics of this batch (see :func:`lbdpo.metrics.preference_metrics`), computed on first access
        so that the training loop, which gathers per-pair values across processes first, pays nothing."""
        return {**preference_metrics(self.per_pair()), "beta_head/w": float(self.w)}

    def per_pair(self) -> dict[str, torch.Tensor]:
        """The detached (B,) tensors, e.g. to gather across processes before :func:`preference_metrics`."""
        return {k: getattr(self, k).detach() for k in PER_PAIR_KEYS if getattr(self, k) is not None}


PACKED_ATTENTION = ("segments", "block_mask")  # trainer.packed_attention's layouts (and auto)


def resolve_packed_attention(option: str | None, device: torch.device | str, compiled: bool = False) -> str:
    """``trainer.packed_attention``; auto (or None) = ``segments`` on CPU (one row without padding: less work),
    ``block_mask`` on accelerators (fewer kernel launches) and under torch.compile (benchmarks/RESULTS.md)."""
    if option not in (None, "auto"):
        return option
    return "segments" if torch.device(device).type == "cpu" and not compiled else "block_mask"


class DynamicBetaDPOModel(nn.Module):
    """Policy + :class:`BetaHead` (+ optional frozen reference) for Learnable-β DPO.

    Args:
        policy_model: any HF causal LM (or a peft-wrapped one), or an
            :class:`lbdpo.modeling.AutoModelForCausalLMWithBetaHead` (then ``beta_head`` is its head).
        beta_head: the β module; its ``hidden_size`` must match the policy's.
        ref_model: a frozen reference causal LM, or ``None`` when reference log-probs are precomputed
            in the batch (or, with LoRA, when the policy's adapter is disabled to get them:
            ``ref_from_disabled_adapter=True``).
        label_smoothing: conservative-DPO label noise (see :func:`lbdpo.losses.dpo_loss`).
        logps_chunk_size: None computes the policy's log-probs from its full logits (N, T, V); a number computes
            only the scored positions from the last hidden state, that many positions at a time, with no
            vocabulary-sized tensor (:mod:`lbdpo.chunked_logps`; same values and gradients to float rounding).
            Architectures whose logits are not plain lm_head(h) fall back to full logits with one log line.
        pack_pairs: run each pair as one segment [prompt | chosen | rejected] (each prompt computed once),
            segments packed without padding (:mod:`lbdpo.packed_pairs`; implies chunked log-probs,
            ``logps_chunk_size`` or 1024 positions). Decoders that cannot take a custom 4D mask fall back to one
            row per response with one log line.
        pad_to_multiple_of: with ``pack_pairs``, the packed rows' length rounded up to a multiple of this (None:
            the longest segment), as the collator rounds unpacked rows; padding, so no number changes.
        packed_attention: with ``pack_pairs``, ``block_mask`` (rows under one 4D mask: few kernels) or
            ``segments`` (one row without padding, attention per segment: less work; switches the policy and
            reference to :data:`lbdpo.packed_pairs.SEGMENT_ATTENTION`, or falls back with one log line). Same numbers.
    """

    def __init__(
        self,
        policy_model: nn.Module,
        beta_head: BetaHead | None = None,
        ref_model: nn.Module | None = None,
        label_smoothing: float = 0.0,
        ref_from_disabled_adapter: bool = False,
        logps_chunk_size: int | None = None,
        pack_pairs: bool = False,
        pad_to_multiple_of: int | None = None,
        packed_attention: str = "block_mask",
    ):
        super().__init__()
        if beta_head is None:  # an AutoModelForCausalLMWithBetaHead: its policy and head
            if not hasattr(policy_model, "beta_head"):
                raise ValueError("DynamicBetaDPOModel needs a beta_head (or a model with one)")
            policy_model, beta_head = policy_model.policy, policy_model.beta_head
        self.policy_model = policy_model
        self.beta_head = beta_head
        # Keep the reference out of this module's parameters/state_dict: it is frozen and saved nowhere.
        self._ref = [ref_model] if ref_model is not None else []
        self.label_smoothing = float(label_smoothing)
        self.ref_from_disabled_adapter = ref_from_disabled_adapter
        self.logps_chunk_size = int(logps_chunk_size) if logps_chunk_size else None
        self.pack_pairs = bool(pack_pairs)
        self.pad_to_multiple_of = int(pad_to_multiple_of) if pad_to_multiple_of else None
        if self.pack_pairs and not self.logps_chunk_size:
            self.logps_chunk_size = 1024
        if self.logps_chunk_size and (why := chunking_unsupported(policy_model)):
            log.warning("logps_chunk_size / pack_pairs: %s; using the full-logits forward, one row per response", why)
            self.logps_chunk_size, self.pack_pairs = None, False
        if self.pack_pairs and (why := packing_unsupported(policy_model)):
            log.warning("pack_pairs: %s; using one row per response (chunked log-probs)", why)
            self.pack_pairs = False
        if packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"packed_attention={packed_attention!r} must be one of {PACKED_ATTENTION}")
        if self.pack_pairs and packed_attention == "segments":
            for model in (policy_model, ref_model):
                if model is not None and (why := use_segment_attention(model)):
                    log.warning("packed_attention=segments: %s; that model packs rows under a block mask", why)

    def describe_forward(self) -> str:
        """E.g. ``packed pairs, attention per segment``: which forward the policy runs (the run's banner)."""
        if self.pack_pairs:
            per_segment = self.policy_model.config._attn_implementation == SEGMENT_ATTENTION
            return "packed pairs, " + ("attention per segment (one row)" if per_segment else "rows under a block mask")
        return "one row per response, " + ("chunked log-probs" if self.logps_chunk_size else "full logits")

    @property
    def ref_model(self) -> nn.Module | None:
        return self._ref[0] if self._ref else None

    def drop_reference(self) -> None:
        """Forget the reference copy (after its log-probs were precomputed into the data), freeing its memory."""
        self._ref.clear()

    @torch.no_grad()
    def reference_logps(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs of the chosen and rejected responses, each (B,) (the reference in eval mode)."""
        if "reference_chosen_logps" in batch and "reference_rejected_logps" in batch:
            return batch["reference_chosen_logps"].float(), batch["reference_rejected_logps"].float()
        if self.ref_model is not None:
            logps = self.response_logps_of(self.ref_model, batch)
        elif self.ref_from_disabled_adapter:
            with self.policy_model.disable_adapter():
                logps = self.response_logps_of(self.policy_model, batch)
        else:
            raise ValueError(
                "no reference: pass ref_model, precomputed reference_*_logps in the batch, "
                "or ref_from_disabled_adapter=True with a peft policy"
            )
        n = logps.shape[0] // 2
        return logps[:n], logps[n:]

    def response_logps_of(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log π(y | x) (2B,) of every row under ``model`` (the reference), the way the policy is scored."""
        rows = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        if not self.logps_chunk_size:
            return sequence_logps(model, *rows)
        token_lp, _ = self.token_logps_of(model, *rows, batch["prompt_lengths"].to(rows[0].device), score_prompt=False)
        return response_logps(token_lp, batch["labels"])

    def token_logps_of(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor, prompt_lengths: torch.Tensor, score_prompt: bool = True):
        """Token log-probs (2B, T − 1) of ``model`` and h (B, H) at the chosen rows' last prompt token.

        With ``logps_chunk_size`` only the scored positions get a log-prob (responses of all rows and, with
        ``score_prompt``, the prompt tokens of the chosen rows that log PPL(x) averages; 0 elsewhere), from chunks
        of lm_head(h); with ``pack_pairs`` each pair is one packed segment (each prompt computed once, no padding
        between pairs). h is None without ``score_prompt``.
        """
        n = prompt_lengths.shape[0]
        if self.pack_pairs:
            return packed_pair_token_logps(model, input_ids, attention_mask, prompt_lengths, self.logps_chunk_size,
                                           score_prompt=score_prompt, multiple_of=self.pad_to_multiple_of)
        if not self.logps_chunk_size:
            out = forward_model(model, input_ids, attention_mask, output_hidden_states=score_prompt)
            token_lp, hidden = token_logps(out.logits, input_ids), out.hidden_states[-1] if score_prompt else None
        else:
            hidden, lm_head = decoder_hidden_and_head(model, input_ids, attention_mask,
                                                      position_ids_from_mask(attention_mask))
            scored = labels[:, 1:] != IGNORE_INDEX
            if score_prompt:
                scored[:n] |= prompt_ppl_mask(attention_mask[:n], prompt_lengths)[:, 1:]
            token_lp = chunked_token_logps(hidden, input_ids, lm_head, scored, self.logps_chunk_size)
        if not score_prompt:
            return token_lp, None
        return token_lp, hidden_at_prompt_end(hidden[:n], attention_mask[:n], prompt_lengths)

    # ------------------------------------------------------------------------------------------
    # The DPO forward
    # ------------------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Any]) -> DPOOutput:
        """Learnable-β DPO loss of a collated preference batch (see the module docstring for the contract)."""
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        prompt_lengths = batch["prompt_lengths"].to(input_ids.device)
        n_pairs = prompt_lengths.shape[0]
        if input_ids.shape[0] != 2 * n_pairs:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows; expected 2 × {n_pairs} pairs")

        # 1. One policy forward over chosen and rejected rows.
        token_lp, h = self.token_logps_of(self.policy_model, input_ids, attention_mask, labels, prompt_lengths)
        logps = response_logps(token_lp, labels)  # (2B,)
        policy_chosen_logps, policy_rejected_logps = logps[:n_pairs], logps[n_pairs:]

        # 2-3. From the chosen half: log PPL(x), h at the prompt's last token, and β(x) = w · T(PPL) · f(h).
        #    A non-finite policy output gives a non-finite β and loss, which the trainer's guard skips and
        #    counts (one NaN policy for the whole loop).
        stats = prompt_stats(self.beta_head, token_lp[:n_pairs], h, attention_mask[:n_pairs], prompt_lengths)
        beta, log_ppl = stats.beta, stats.log_ppl

        # 4. Reference log-probs and the DPO loss (eq. 7 of the DPO paper, with β per prompt).
        ref_chosen, ref_rejected = (r.to(logps.device) for r in self.reference_logps(batch))
        kept = None
        if self.beta_head.batch_level is not None:  # β-DPO: one β from the batch's margins, some pairs filtered
            margins = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen, ref_rejected)
            beta, kept = self.beta_head.batch_level(margins, update=self.training)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen, ref_rejected, beta,
            label_smoothing=self.label_smoothing,
        )
        dpo_term = losses.mean() if kept is None else (losses * kept).sum() / kept.sum().clamp(min=1.0)
        loss = (dpo_term + self.beta_head.regularization_loss()
                + self.beta_head.auxiliary_loss(log_ppl, stats.log_ppl_approx))

        return DPOOutput(
            loss=loss,
            losses=losses,
            beta=beta,
            log_ppl=log_ppl.detach(),
            f=stats.f.detach(),
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            reference_chosen_logps=ref_chosen,
            reference_rejected_logps=ref_rejected,
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            w=self.beta_head.current_w().detach(),
            log_ppl_approx=None if stats.log_ppl_approx is None else stats.log_ppl_approx.detach(),
            beta_exact=stats.beta_exact,
            kept=kept,
        )
