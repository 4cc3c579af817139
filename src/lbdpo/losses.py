"""The DPO objective (Rafailov et al. 2023, eq. 7) with a per-pair β.

    L = −log σ( β(x) · [ (log πθ(yw|x) − log πref(yw|x)) − (log πθ(yl|x) − log πref(yl|x)) ] )

With ``label_smoothing`` = ε_ls > 0 this is conservative DPO (cDPO, Mitchell 2023): the preference label
is assumed flipped with probability ε_ls,
    L = −(1 − ε_ls) · log σ(β·Δ) − ε_ls · log σ(−β·Δ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from .errors import LbdpoError


def logratio_margin(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor) -> torch.Tensor:
    """Δ = (log πθ(yw|x) − log πref(yw|x)) − (log πθ(yl|x) − log πref(yl|x)), (B,): what β multiplies in eq. 7."""
    return (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float | torch.Tensor,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards.

    Args:
        policy_chosen_logps: (B,) summed log πθ(yw|x) over response tokens.
        policy_rejected_logps: (B,) summed log πθ(yl|x).
        reference_chosen_logps: (B,) summed log πref(yw|x).
        reference_rejected_logps: (B,) summed log πref(yl|x).
        beta: a float, or a (B,) tensor of per-prompt β (gradients flow into it).
        label_smoothing: cDPO's assumed label-noise rate in [0, 0.5).

    Returns:
        losses (B,); chosen_rewards (B,) = β·(log πθ(yw|x) − log πref(yw|x)), detached;
        rejected_rewards (B,) likewise for yl.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise LbdpoError(f"label_smoothing={label_smoothing!r} must be in [0, 0.5)")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # log πθ(yw|x)/πref(yw|x)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # log πθ(yl|x)/πref(yl|x)
    logits = beta * (chosen_logratios - rejected_logratios)  # β·Δ, the argument of σ in eq. 7
    losses = -F.logsigmoid(logits) * (1.0 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards
