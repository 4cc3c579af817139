"""DynamicBetaDPOModel: a policy, its BetaHead and a reference, computing the Learnable-β DPO loss.

Batch contract (what :meth:`DynamicBetaDPOModel.forward` takes; built by :mod:`lbdpo.data.collator`):

    input_ids       (2B, T) long   rows 0..B−1 = prompt + chosen, rows B..2B−1 = prompt + rejected
    attention_mask  (2B, T) long   1 on real tokens; left or right padding both work
    labels          (2B, T) long   = input_ids on response tokens, −100 on prompt and padding
    prompt_lengths  (B,)    long   number of prompt tokens (≥ 2) of pair i, same in both of its rows
    domain          list[str] of B, optional: each pair's domain (``beta_head=per_domain`` needs it)
    reference_chosen_logps, reference_rejected_logps   (B,) float, optional: precomputed
                                   log πref(y|x); used instead of running the reference model

One policy forward gives everything: the summed response log-probs (labels), the prompt's log PPL (its
positions are independent of the response under causal attention, so this is exact), and the last-layer hidden
state at the prompt's last token. Which forward runs — the 2B padded rows, or each pair as one packed segment with
its prompt computed once — is the model's :class:`lbdpo.scoring.Scorer`, chosen once from ``forward`` /
``packed_attention`` and used alike for the policy, the reference and evaluation. Every path gives the same values
and gradients (tests against one sequence at a time).

The design documents' API: :meth:`DynamicBetaDPOModel.compute_ppl` and :meth:`DynamicBetaDPOModel.get_dynamic_beta`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn as nn

from .errors import LbdpoError
from .logprobs import masked_mean_nll, prompt_ppl_mask, response_logps
from .losses import dpo_loss, logratio_margin
from .metrics import preference_metrics
from .packed_flex import enable_flex_attention
from .packed_pairs import enable_segment_attention, restore_attention
from .scoring import ForwardPlan, Scorer, plan_forward

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


def prompt_stats(beta_head: "BetaHead", token_lp: torch.Tensor, h: torch.Tensor, attention_mask: torch.Tensor,
                 prompt_lengths: torch.Tensor, domains: Sequence[str] | None = None) -> PromptStats:
    """β(x), log PPL(x) and f of each row's prompt, from a forward over prompt (+ response) rows and its h.

    Causal attention makes a prompt's positions independent of what follows it, so reading them from a
    prompt + response row is exact. The one implementation, used by training and by the model API.

    Args:
        beta_head: the β module; token_lp: (B, T − 1) from :func:`lbdpo.logprobs.token_logps`;
        h: (B, H) from :func:`lbdpo.scoring.hidden_at_prompt_end`; attention_mask: (B, T); prompt_lengths: (B,) (≥ 2 each);
        domains: B domain names (the batch's ``domain`` list), which ``beta_head=per_domain`` needs.
    """
    log_ppl = masked_mean_nll(token_lp, prompt_ppl_mask(attention_mask, prompt_lengths))
    beta, details = beta_head(h, log_ppl=log_ppl, return_details=True, domains=domains)  # β = w · T(PPL) · f(h)
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
    hidden: torch.Tensor | None = None  # (B, H) h, detached: the head's input (beta_head.objective=validation)

    @functools.cached_property
    def metrics(self) -> dict[str, float]:
        """Scalar metrics of this batch (see :func:`lbdpo.metrics.preference_metrics`), computed on first access
        so that the training loop, which gathers per-pair values across processes first, pays nothing."""
        return {**preference_metrics(self.per_pair()), "beta_head/w": float(self.w)}

    def per_pair(self) -> dict[str, torch.Tensor]:
        """The detached (B,) tensors, e.g. to gather across processes before :func:`preference_metrics`."""
        return {k: getattr(self, k).detach() for k in PER_PAIR_KEYS if getattr(self, k) is not None}


def real_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) real tokens of each prompt row; an error when one has fewer than 2 (nothing to average a PPL over)."""
    lengths = attention_mask.long().sum(-1)
    if bool((lengths < 2).any()):
        raise LbdpoError(f"every row needs ≥ 2 real tokens for its perplexity; attention_mask sums to {lengths.tolist()}")
    return lengths


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
        forward: ``rows`` (the 2B padded rows; default), ``packed`` (each pair one segment, prompt once) or ``auto``
            (the measured default for ``device``): see :mod:`lbdpo.scoring`. A path the model cannot run is refused
            (:class:`lbdpo.errors.LbdpoError`); ``auto`` falls back with one log line.
        packed_attention: with ``packed``: ``segments`` (one row without padding, attention per segment), ``block_mask``
            (rows under one 4D mask) or ``auto``. Same numbers.
        logps_chunk_size: None scores rows from their full logits (N, T, V); a number scores only the needed
            positions from the last hidden state, that many at a time (:mod:`lbdpo.chunked_logps`; the packed path
            always chunks, 1024 by default).
        pad_to_multiple_of: with ``packed``, the packed rows' length rounded up to a multiple of this (padding).
        device, compiled: what ``auto`` resolves against (default: the policy's device; torch.compile).

    With ``packed_attention`` resolved to ``segments`` the policy (and the reference) are switched to the attention
    function :data:`lbdpo.packed_pairs.SEGMENT_ATTENTION` (sdpa for every other forward, not saved with the model):
    a change to the models passed in, for this object's lifetime; :meth:`restore_attention` switches them back.
    """

    def __init__(
        self,
        policy_model: nn.Module,
        beta_head: BetaHead | None = None,
        ref_model: nn.Module | None = None,
        label_smoothing: float = 0.0,
        ref_from_disabled_adapter: bool = False,
        forward: str = "rows",
        packed_attention: str = "auto",
        logps_chunk_size: int | None = None,
        pad_to_multiple_of: int | None = None,
        device: torch.device | str | None = None,
        compiled: bool = False,
    ):
        super().__init__()
        if beta_head is None:  # an AutoModelForCausalLMWithBetaHead: its policy and head
            if not hasattr(policy_model, "beta_head"):
                raise LbdpoError("DynamicBetaDPOModel needs a beta_head (or a model with one)")
            policy_model, beta_head = policy_model.policy, policy_model.beta_head
        self.policy_model = policy_model
        self.beta_head = beta_head
        # Keep the reference out of this module's parameters/state_dict: it is frozen and saved nowhere.
        self._ref = [ref_model] if ref_model is not None else []
        self.label_smoothing = float(label_smoothing)
        self.ref_from_disabled_adapter = ref_from_disabled_adapter
        plan = plan_forward(policy_model, forward, packed_attention, logps_chunk_size, pad_to_multiple_of, device,
                            compiled)
        self.scorer = Scorer(self._switch_attention(plan, explicit=packed_attention != "auto"))

    def _switch_attention(self, plan: ForwardPlan, explicit: bool) -> ForwardPlan:
        """Switch the policy and reference to per-segment attention (or FlexAttention) when ``plan`` asks for it; a
        model that cannot switch is refused (an explicit layout) or puts both on the block mask (``auto``, one log
        line)."""
        enable = {"segments": enable_segment_attention, "flex": enable_flex_attention}.get(plan.packed_attention)
        if enable is None:
            return plan
        for model in (self.policy_model, self.ref_model):
            if model is not None and (why := enable(model)):
                self.restore_attention()
                if explicit:
                    raise LbdpoError(f"trainer.packed_attention={plan.packed_attention}: {why}; set "
                                     "trainer.packed_attention=block_mask (or auto)")
                log.info("trainer.packed_attention=auto: rows under a block mask, since %s", why)
                return dataclasses.replace(plan, packed_attention="block_mask")
        return plan

    def restore_attention(self) -> None:
        """Switch the policy and reference back to sdpa if per-segment attention switched them (see the class doc)."""
        for model in (self.policy_model, self.ref_model):
            if model is not None:
                restore_attention(model)

    @property
    def plan(self) -> ForwardPlan:
        """The forward this model runs (:class:`lbdpo.scoring.ForwardPlan`)."""
        return self.scorer.plan

    def describe_forward(self) -> str:
        """E.g. ``packed pairs, attention per segment (one row)``: which forward runs (the run's banner)."""
        return self.plan.describe()

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
            logps = self.scorer.response_logps(self.ref_model, batch)
        elif self.ref_from_disabled_adapter:
            with self.policy_model.disable_adapter():
                logps = self.scorer.response_logps(self.policy_model, batch)
        else:
            raise LbdpoError(
                "no reference: pass ref_model, precomputed reference_*_logps in the batch, "
                "or ref_from_disabled_adapter=True with a peft policy"
            )
        n = logps.shape[0] // 2
        return logps[:n], logps[n:]

    def token_logps_of(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor, prompt_lengths: torch.Tensor, score_prompt: bool = True):
        """Token log-probs (2B, T − 1) of ``model`` and h (B, H) at the chosen rows' last prompt token, by this
        model's forward (:meth:`lbdpo.scoring.Scorer.token_logps`)."""
        return self.scorer.token_logps(model, input_ids, attention_mask, labels, prompt_lengths, score_prompt)

    # ------------------------------------------------------------------------------------------
    # The design documents' API: PPL and β of prompts
    # ------------------------------------------------------------------------------------------

    def _prompt_stats(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      domains: Sequence[str] | None = None) -> PromptStats:
        """PromptStats of B prompt-only rows (any padding side), from one policy forward."""
        lengths = real_lengths(attention_mask)
        token_lp, h = self.scorer.prompt_logps(self.policy_model, input_ids, attention_mask)
        return prompt_stats(self.beta_head, token_lp, h, attention_mask, lengths, domains)

    @torch.no_grad()
    def compute_ppl(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Perplexity of each row under the policy, no gradient (the design documents' ``compute_ppl``).

        PPL = exp(−(1/(m−1)) Σ_{i=2..m} log πθ(x_i | x_<i)) over the row's m real tokens (the first has no
        prediction); padding on either side never counts. Equals one unpadded row at a time (tested).

        Args:
            input_ids: (B, T); attention_mask: (B, T), 1 on real tokens, ≥ 2 per row.

        Returns:
            (B,) float32.
        """
        lengths = real_lengths(attention_mask)
        token_lp, _ = self.scorer.prompt_logps(self.policy_model, input_ids, attention_mask)
        return torch.exp(masked_mean_nll(token_lp, prompt_ppl_mask(attention_mask, lengths)))

    def get_dynamic_beta(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         domains: Sequence[str] | None = None) -> torch.Tensor:
        """β(x) = w · T(PPL(x)) · f(h) of each prompt row (the design documents' ``get_dynamic_beta``): PPL as
        :meth:`compute_ppl`, h the policy's last hidden state at the row's last real token, both from one forward.

        Args:
            input_ids: (B, T) prompts, any padding side; attention_mask: (B, T), ≥ 2 real tokens per row.
            domains: B domain names (``beta_head=per_domain`` needs them).

        Returns:
            (B,) β. Follows the ambient grad mode (the head's parameters get gradients; wrap in ``torch.no_grad()``
            for analysis). Under ``normalize=batch_mean`` a row's β depends on the other rows, as in training.
        """
        return self._prompt_stats(input_ids, attention_mask, domains).beta

    # ------------------------------------------------------------------------------------------
    # The DPO forward
    # ------------------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Any]) -> DPOOutput:
        """Learnable-β DPO loss of a collated preference batch (see the module docstring for the contract)."""
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        prompt_lengths = batch["prompt_lengths"].to(input_ids.device)
        n_pairs = prompt_lengths.shape[0]
        if input_ids.shape[0] != 2 * n_pairs:
            raise LbdpoError(f"input_ids has {input_ids.shape[0]} rows; expected 2 × {n_pairs} pairs")

        # 1. One policy forward over chosen and rejected rows.
        token_lp, h = self.token_logps_of(self.policy_model, input_ids, attention_mask, labels, prompt_lengths)
        logps = response_logps(token_lp, labels)  # (2B,)
        policy_chosen_logps, policy_rejected_logps = logps[:n_pairs], logps[n_pairs:]

        # 2-3. From the chosen half: log PPL(x), h at the prompt's last token, and β(x) = w · T(PPL) · f(h).
        #    A non-finite policy output gives a non-finite β and loss, which the trainer's guard skips and
        #    counts (one NaN policy for the whole loop).
        stats = prompt_stats(self.beta_head, token_lp[:n_pairs], h, attention_mask[:n_pairs], prompt_lengths,
                             batch.get("domain"))  # the pairs' domains: β of beta_head=per_domain
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
            hidden=stats.hidden.detach(),
        )
