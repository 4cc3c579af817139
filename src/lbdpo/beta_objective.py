"""What trains the learnable β head: ``beta_head.objective``, and the checks of its keys.

``dpo`` (default, the design documents): the head's parameters φ get the gradient of the training DPO loss itself,
∂L/∂φ, like the policy's. ``validation``: they get instead a one-step look-ahead hypergradient of a held-out DPO loss
at a fixed β₀ (``val_beta``), computed every ``val_every`` optimizer steps (no gradient for the head on the other
steps); the derivation, the finite-difference product and the held-out slice are in
:mod:`lbdpo.train.beta_validation`. This module only holds what a :class:`lbdpo.beta_head.BetaHeadConfig` can check
on its own: the keys, and the head options the hypergradient cannot serve (each refused with one line naming it).
Two heads train under either objective: the design's ``learnable`` formula and ``per_domain_learned``
(:mod:`lbdpo.beta_domains`, one log β per domain).
"""

from __future__ import annotations

import math
from typing import Any

from .errors import LbdpoError

OBJECTIVES = ("dpo", "validation")


def validate(config: Any) -> None:
    """``objective``, ``val_every``, ``val_beta`` of a :class:`BetaHeadConfig` (duck-typed), and under
    ``objective=validation`` the head options it needs; an :class:`LbdpoError` naming the key otherwise."""
    if config.objective not in OBJECTIVES:
        raise LbdpoError(f"beta_head.objective={config.objective!r} must be one of {OBJECTIVES}")
    every = config.val_every
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every != int(every) or every < 1:
        raise LbdpoError(f"beta_head.val_every={every!r} must be a whole number ≥ 1 (optimizer steps)")
    beta = config.val_beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        raise LbdpoError(f"beta_head.val_beta={beta!r} must be a finite number > 0 (β₀ of the held-out loss)")
    if config.objective != "validation" or config.mode == "per_domain_learned":
        return  # per_domain_learned: its β depends on neither h nor log PPL, and its log β per domain always trains
    if config.mode != "learnable":
        raise LbdpoError(f"beta_head.objective=validation trains a learned β, and mode={config.mode} has no "
                         "trainable β: use beta_head=linear (or mlp, or per_domain_learned), or "
                         "beta_head.objective=dpo")
    for key in ("detach_hidden", "detach_ppl"):
        if not getattr(config, key):
            raise LbdpoError(f"beta_head.{key}=false with beta_head.objective=validation: the hypergradient needs β "
                             f"independent of the policy (β on the head only, Δ on the policy only); set "
                             f"beta_head.{key}=true")
    if float(config.dropout) > 0 and float(config.epsilon) > 0 and config.context_net_type == "mlp":
        raise LbdpoError(f"beta_head.dropout={config.dropout} with beta_head.objective=validation: the hypergradient "
                         "recomputes β from the head, which would draw other dropout masks than the training "
                         "forward; set beta_head.dropout=0")
    w_trained = bool(config.w_trainable) and config.normalize != "batch_mean"
    if not w_trained and float(config.epsilon) == 0:
        raise LbdpoError("beta_head.objective=validation: this head has no trainable parameter (w fixed by "
                         "w_trainable=false or normalize=batch_mean, and epsilon=0 turns f off); train w or set "
                         "beta_head.epsilon > 0")
