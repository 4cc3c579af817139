"""The per-prompt β of Learnable-β DPO.

    β(x) = w · T(PPL_πθ(x)) · f(h),     f(h) = 1 + ε · tanh(NN(h))

- ``w``: a scalar, an ``nn.Parameter`` (``w_trainable=True``, default) or a fixed buffer. ``w_param=log`` trains
  log w instead (w = exp(log w) > 0 always; see the known trap below); ``w_param=linear`` (default) trains w itself.
- ``T``: the perplexity term, ``ppl_transform``:
    ``log_ppl``         T = log PPL(x)              (log-PPL form; default)
    ``ppl``             T = PPL(x)                  (linear-PPL form)
    ``none``            T = 1                       (ablation: no perplexity)
    ``inverse_log_ppl`` T = 1 / (1 + log PPL(x))    (ablation: β decreasing in perplexity)
  where log PPL(x) = mean token NLL of the prompt x under the policy.
- ``h``: the policy's last-layer hidden state at the prompt's last token; ``NN``: linear or MLP.
  ``f`` lies in [1 − ε, 1 + ε]; ε = 0 gives f ≡ 1.
- ``normalize=batch_mean``: β_i = target_beta · g_i / mean_j g_j with g_i = w·T_i·f_i, so the head only
  learns how to *distribute* β across the prompts of a batch (w cancels, so it is kept as a buffer). The mean
  is over the micro-batch this module sees (one process, one gradient-accumulation step), so the β of a
  prompt depends on its batch-mates; with ε = 0 and ``ppl_transform=none`` every β equals target_beta.
- ``mode=fixed``: β ≡ ``beta`` for every prompt: plain DPO through the same code path (the baseline).
- ``mode=beta_dpo``: β-DPO (Wu et al. 2024), one detached β per batch from the batch's margins, with optional
  margin-guided filtering (:mod:`lbdpo.beta_dpo`; ``beta`` is its β₀). This head returns β₀; the DPO model applies
  the batch-level correction once the margins are known (:attr:`BetaHead.batch_level`).
- ``mode=per_domain``: β_i = ``domain_betas[domain_i]`` (else ``beta``); ``per_domain_learned``: one learned log β per
  domain (:mod:`lbdpo.beta_domains`, both through :class:`DomainBetas`); ``mode=schedule``: one β(t), piecewise linear
  in the optimizer step t (:meth:`BetaHead.set_step`), e.g. replaying another run's mean β: :mod:`lbdpo.beta_modes`.
- ``use_ppl_approx``: a second network on h predicts log PPL(x) (ℓ̂ = NN_ppl(LayerNorm(h))), trained only by
  the auxiliary loss ``ppl_approx_loss_weight`` · mean (ℓ̂ − log PPL)² against the exact, detached value of
  the same forward; β then uses max(ℓ̂, 0) in place of log PPL. Its point is inference: β of a prompt from one
  hidden state, without scoring every prompt token. Its output bias starts at the first batch's mean log PPL
  (:mod:`lbdpo.beta_init`, which also sets w under ``w_init=auto``; neither reads the device once it has run).
- ``objective``: ``dpo`` trains the head on the training loss (the design); ``validation`` on a held-out loss's
  one-step look-ahead hypergradient (:mod:`lbdpo.beta_objective`, :mod:`lbdpo.train.beta_validation`).

Known trap: with the DPO loss alone, dL/dβ = −Δ·σ(−βΔ) (Δ the log-ratio margin), which is negative
whenever a pair's margin is positive, so a trainable w drifts upward as the policy learns. The
``batch_mean`` normalisation and the ``w_prior_weight`` penalty w_prior·(log w − log w_init)² are the
two remedies offered; the defaults follow the design documents (learnable w, no normalisation).

Second trap, of scale: Adam moves a parameter by about its learning rate per step whatever the gradient's size,
so a linear w of `w_init=auto` scale (target_beta / mean log PPL: 0.02 on SmolLM2's sentiment prompts, 0.008 for a
random 151k-vocabulary model) moves by 5–12 % of itself per step at ``beta_head_lr`` = 1e-3, and a run of
same-signed gradients (negative margins early in training) carries it through 0, where every β sits at
``beta_min`` with no gradient left. ``w_param=log`` makes the step relative (≈ ``beta_head_lr`` of log w, i.e.
≈ 0.1 % of w per step at 1e-3, whatever w's scale) and w can never reach 0; raise ``beta_head_lr`` for a faster w.

:class:`DynamicBetaDPOModel`, which wires this head to a policy, lives in :mod:`lbdpo.dpo_model` and is
importable from here too (``from lbdpo.beta_head import DynamicBetaDPOModel``, the design documents' import).

Non-finite input (a NaN policy forward gives a NaN log PPL and h) is not an error here: β comes out
non-finite, so does the loss, and the trainer's guard skips and counts the step (one policy for NaN).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .beta_dpo import BetaDPO, check_beta_dpo_options
from .beta_init import InitFlags, auto_init_w, init_ppl_approx
from .beta_domains import DOMAIN_MODES, DomainBetas
from .beta_modes import RULE_MODES, describe, interpolate, read_beta_schedule, validate as validate_rule_mode
from .beta_objective import validate as validate_objective
from .dpo_model import DynamicBetaDPOModel  # re-exported (the design documents' import); it never imports back
from .errors import LbdpoError

PPL_TRANSFORMS = ("log_ppl", "ppl", "none", "inverse_log_ppl")
NET_TYPES = ("linear", "mlp")
NORMALIZATIONS = ("none", "batch_mean")
W_PARAMS = ("linear", "log")
MODES = ("learnable", "fixed", "beta_dpo", *RULE_MODES)
FIXED_MODES = ("fixed", "beta_dpo", *RULE_MODES)  # not the formula: β from the config (per_domain_learned: a table)


@dataclass
class BetaHeadConfig:
    """Configuration of :class:`BetaHead` (field names follow the design documents where they exist)."""

    mode: str = "learnable"  # "learnable": β(x) from the formula; "fixed": β ≡ `beta` (plain DPO); MODES lists all
    beta: float = 0.1  # the constant β of mode="fixed"; β₀ of mode="beta_dpo"; unlisted domains' β of "per_domain"
    domain_betas: dict[str, float] | None = None  # mode="per_domain": domain → its fixed β (per_domain_learned: start)
    domains: list[str] | None = None  # mode="per_domain_learned": its table's domains, set from the training data
    schedule: list[list[float]] | None = None  # mode="schedule": knots [[step, β], ...] of a piecewise-linear β(step)
    schedule_from: str | None = None  # mode="schedule": a run (folder, metrics.jsonl) whose beta/mean is replayed
    beta_dpo_alpha: float = 0.6  # β-DPO's α: β_batch = β₀·[1 + α·(mean margin − M₀)]
    beta_dpo_filter: float = 0.2  # β-DPO's filtering ratio ρ: the fraction of each batch's pairs dropped (0 = off)
    beta_dpo_momentum: float = 0.9  # γ of β-DPO's moving averages M₀, σ of the batch margins
    hidden_size: int = 768  # width of the policy's last hidden state (taken from the model config)
    context_net_type: str = "linear"  # NN in f(h): "linear" or "mlp"
    context_mlp_hidden_size: int = 128  # hidden width of the "mlp" NN
    epsilon: float = 0.1  # f(h) ∈ [1−ε, 1+ε]; must be in [0, 1); 0 gives f ≡ 1
    dropout: float = 0.0  # dropout inside the "mlp" NN
    w_trainable: bool = True  # w is an nn.Parameter (True) or a fixed buffer (False)
    w_param: str = "linear"  # what the optimizer trains: "linear" (w itself) or "log" (log w; w = exp(log w) > 0)
    w_init: float | str = "auto"  # initial w (> 0), or "auto": set on the first batch so that mean β = target_beta
    target_beta: float = 0.1  # the mean β aimed at by w_init="auto" and by normalize="batch_mean"
    ppl_transform: str = "log_ppl"  # T(PPL): "log_ppl", "ppl", "none", "inverse_log_ppl"
    normalize: str = "none"  # "none" or "batch_mean" (β_i = target_beta · g_i / mean_j g_j)
    w_prior_weight: float = 0.0  # weight of the penalty (log w − log w_init)²; 0 disables it
    beta_min: float = 1e-4  # clamp: β never falls below this (keeps the loss well defined if w → 0)
    beta_max: float = 1e4  # clamp: β never exceeds this (guards against exp overflow of ppl_transform="ppl")
    detach_hidden: bool = True  # stop gradients from β into the policy through h
    detach_ppl: bool = True  # stop gradients from β into the policy through log PPL
    init_std: float = 0.02  # std of the NN's weight init (bias 0): a linear NN(h) starts with std ≈ init_std·‖h‖₂
    # over inits — ≈ 1 for SmolLM2, whose ‖h‖₂ ≈ 55 (lbdpo.eval.prompt_stats): f starts inside, not at the middle
    # of, [1 − ε, 1 + ε]
    use_ppl_approx: bool = False  # β uses a network's approximation of log PPL from h (see the module docstring)
    ppl_net_type: str = "linear"  # that network: "linear" or "mlp"
    ppl_mlp_hidden_size: int = 128  # hidden width of the "mlp" approximation network
    ppl_approx_loss_weight: float = 1.0  # weight of its regression loss (ℓ̂ − log PPL)²
    objective: str = "dpo"  # what trains the head: "dpo" (the training loss) | "validation" (lbdpo.beta_objective)
    val_every: int = 1  # objective="validation": the head's hypergradient every this many optimizer steps
    val_beta: float = 0.1  # objective="validation": β₀ of the held-out DPO loss (fixed, so it does not depend on φ)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the offending key for any invalid setting."""
        if self.mode not in MODES:
            raise LbdpoError(f"beta_head.mode={self.mode!r} must be one of {MODES}")
        for f in fields(self):  # numbers first, so that a typo names its key rather than failing in float()
            value = getattr(self, f.name)
            if f.type in ("float", "int", "int | None") and value is not None:
                try:
                    float(value)
                except (TypeError, ValueError):
                    raise LbdpoError(f"beta_head.{f.name}={value!r} must be a number") from None
        validate_rule_mode(self)  # domain_betas, schedule, schedule_from: only under their modes, well formed
        validate_objective(self)  # objective, val_every, val_beta, and what objective=validation needs
        if self.mode in FIXED_MODES:
            if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
                raise LbdpoError(f"beta_head.beta={self.beta!r} must be a finite number > 0")
            if self.mode == "beta_dpo":
                check_beta_dpo_options(self.beta_dpo_alpha, self.beta_dpo_filter, self.beta_dpo_momentum)
            return
        if self.context_net_type not in NET_TYPES:
            raise LbdpoError(f"beta_head.context_net_type={self.context_net_type!r} must be one of {NET_TYPES}")
        if not (0.0 <= float(self.epsilon) < 1.0):
            raise LbdpoError(f"beta_head.epsilon={self.epsilon!r} must be in [0, 1)")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise LbdpoError(f"beta_head.dropout={self.dropout!r} must be in [0, 1)")
        if int(self.hidden_size) <= 0 or int(self.context_mlp_hidden_size) <= 0:
            raise LbdpoError("beta_head.hidden_size and beta_head.context_mlp_hidden_size must be positive")
        if isinstance(self.w_init, str):
            if self.w_init != "auto":
                raise LbdpoError(f"beta_head.w_init={self.w_init!r} must be a number > 0 or 'auto'")
        elif not (0 < float(self.w_init) < torch.finfo(torch.float32).max):  # w is a float32 parameter
            raise LbdpoError(f"beta_head.w_init={self.w_init!r} must be > 0 and fit in float32 (or 'auto')")
        if self.w_param not in W_PARAMS:
            raise LbdpoError(f"beta_head.w_param={self.w_param!r} must be one of {W_PARAMS}")
        if not float(self.target_beta) > 0:
            raise LbdpoError(f"beta_head.target_beta={self.target_beta!r} must be > 0")
        if self.ppl_transform not in PPL_TRANSFORMS:
            raise LbdpoError(f"beta_head.ppl_transform={self.ppl_transform!r} must be one of {PPL_TRANSFORMS}")
        if self.normalize not in NORMALIZATIONS:
            raise LbdpoError(f"beta_head.normalize={self.normalize!r} must be one of {NORMALIZATIONS}")
        if float(self.w_prior_weight) < 0:
            raise LbdpoError(f"beta_head.w_prior_weight={self.w_prior_weight!r} must be >= 0")
        if self.ppl_net_type not in NET_TYPES:
            raise LbdpoError(f"beta_head.ppl_net_type={self.ppl_net_type!r} must be one of {NET_TYPES}")
        if self.use_ppl_approx and not (int(self.ppl_mlp_hidden_size) > 0 and float(self.ppl_approx_loss_weight) > 0):
            raise LbdpoError("beta_head.use_ppl_approx needs ppl_mlp_hidden_size > 0 and ppl_approx_loss_weight > 0 "
                             f"(got {self.ppl_mlp_hidden_size}, {self.ppl_approx_loss_weight})")
        if not (0 < float(self.beta_min) < float(self.beta_max)):
            raise LbdpoError(f"beta_head.beta_min={self.beta_min!r} and beta_head.beta_max={self.beta_max!r} "
                             "must satisfy 0 < beta_min < beta_max")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], **overrides: Any) -> "BetaHeadConfig":
        """Build from a dict / OmegaConf node; unknown keys raise a ``ValueError`` that names them."""
        data = {**dict(cfg), **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LbdpoError(f"unknown beta_head key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def scalar_net(kind: str, hidden_size: int, mlp_hidden_size: int, dropout: float, init_std: float) -> nn.Module:
    """(…, H) → (…, 1): ``linear`` or ``mlp`` (Linear → GELU → Dropout → Linear); weights N(0, init_std), bias 0."""
    if kind == "linear":
        net = nn.Linear(hidden_size, 1)
    else:
        net = nn.Sequential(nn.Linear(hidden_size, mlp_hidden_size), nn.GELU(), nn.Dropout(dropout),
                            nn.Linear(mlp_hidden_size, 1))
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=init_std)
            nn.init.zeros_(module.bias)
    return net


class BetaHead(nn.Module):
    """Computes β(x) (B,) from the prompt's last hidden state (B, H) and its perplexity (B,)."""

    def __init__(self, config: BetaHeadConfig):
        super().__init__()
        config.validate()
        if config.mode == "schedule" and config.schedule is None:  # another run's β curve, read once, kept in config
            config = dataclasses.replace(config, schedule=read_beta_schedule(config.schedule_from))
        self.config = config
        self.fixed = config.mode in FIXED_MODES  # no learnable β: β from `beta`, the domain map or the schedule
        self.domain_table = DomainBetas(config) if config.mode in DOMAIN_MODES else None  # β by domain (beta_domains)
        self.epsilon = float(config.epsilon)
        self.batch_level = BetaDPO(config.beta, config.beta_dpo_alpha, config.beta_dpo_filter,
                                   config.beta_dpo_momentum) if config.mode == "beta_dpo" else None
        self.log_w = None  # the trained parameter under w_param="log" (then there is no attribute w: see current_w)
        self.init_flags = InitFlags()  # done-flags of the first-batch initialisations, mirrored on the host (beta_init)
        if self.fixed:
            # No parameters: a buffer keeps the β value in checkpoints and on the right device (schedule: β(t))
            self.register_buffer("w", torch.tensor(float(config.beta)))
            if config.mode == "schedule":  # the step t of β(t), set by set_step; saved, so evaluation uses β(t)
                self.register_buffer("schedule_step", torch.tensor(0, dtype=torch.long))
                self.set_step(0)
            self.context_net = None
            return

        auto = config.w_init == "auto"
        w0 = 1.0 if auto else float(config.w_init)
        # Under batch_mean, w cancels out of β: as a Parameter it would only drift on float-noise gradients
        # that Adam scales up to full-size steps, so it is a buffer there.
        # The parameter is 1-D with one element, not 0-d: FSDP2 cannot shard a scalar parameter.
        if config.w_trainable and config.normalize != "batch_mean":
            if config.w_param == "log":
                self.log_w = nn.Parameter(torch.tensor([math.log(w0)]))
            else:
                self.w = nn.Parameter(torch.tensor([w0]))
        else:
            self.register_buffer("w", torch.tensor(w0))
        # The w that w_prior_weight pulls towards; for "auto" it is set with w on the first batch.
        self.register_buffer("w_init_value", torch.tensor(w0))
        self.init_flags.add(self, "w_initialized", not auto)

        # f ≡ 1 when ε = 0: no NN, so no parameter that never receives a gradient (DDP rejects those)
        self.context_net = None if self.epsilon == 0.0 else scalar_net(
            config.context_net_type, config.hidden_size, config.context_mlp_hidden_size, config.dropout, config.init_std)
        self.ppl_net = None
        if config.use_ppl_approx:
            self.ppl_net = nn.Sequential(nn.LayerNorm(config.hidden_size, elementwise_affine=False), scalar_net(
                config.ppl_net_type, config.hidden_size, config.ppl_mlp_hidden_size, 0.0, config.init_std))
            self.init_flags.add(self, "ppl_net_initialized", False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before w became 1-D hold it as a 0-d tensor (and a buffer w is 0-d): same value
        key = prefix + "w"
        if key in state_dict and state_dict[key].numel() == 1 and self.log_w is None:
            state_dict[key] = state_dict[key].reshape(self.w.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.init_flags.reload(self)  # the loaded done-flags (lbdpo.beta_init)

    def current_w(self) -> torch.Tensor:
        """w as β uses it: the parameter or buffer ``w``, or exp(``log_w``) under ``w_param=log`` (differentiable)."""
        return torch.exp(self.log_w) if self.log_w is not None else self.w

    @torch.no_grad()
    def set_step(self, step: int) -> None:
        """The optimizer step t about to be computed (1 for the first: the trainer calls this before each step).
        Only ``mode=schedule`` reads it: β = β(t) from here on, evaluation included; a no-op for the other modes."""
        if self.config.mode == "schedule":
            self.schedule_step.fill_(int(step))
            self.w.fill_(interpolate(self.config.schedule, int(step)))

    @property
    def _anchor(self) -> torch.Tensor:
        """A tensor of this head whose device and dtype β takes (w under every setting but ``w_param=log``)."""
        return self.w_init_value if self.log_w is not None else self.w

    # ---------------------------------------------------------------------------------------------

    def ppl_term(self, log_ppl: torch.Tensor) -> torch.Tensor:
        """T(PPL) of the module docstring, from log PPL (B,) → (B,)."""
        kind = self.config.ppl_transform
        if kind == "log_ppl":
            return log_ppl
        if kind == "ppl":
            return torch.exp(log_ppl.clamp(max=math.log(self.config.beta_max)))
        if kind == "none":
            return torch.ones_like(log_ppl)
        return 1.0 / (1.0 + log_ppl)  # inverse_log_ppl; log_ppl ≥ 0 so the denominator is ≥ 1

    def context_factor(self, context_embedding: torch.Tensor) -> torch.Tensor:
        """f(h) = 1 + ε·tanh(NN(h)): (B, H) → (B,), in [1 − ε, 1 + ε]."""
        h = context_embedding.to(self._anchor.dtype)
        if self.config.detach_hidden:
            h = h.detach()
        if self.epsilon == 0.0:
            return torch.ones(h.shape[0], dtype=h.dtype, device=h.device)
        return 1.0 + self.epsilon * torch.tanh(self.context_net(h).squeeze(-1))

    def forward(self, context_embedding: torch.Tensor, ppl: torch.Tensor | None = None, *,
                log_ppl: torch.Tensor | None = None, return_details: bool = False,
                domains: Sequence[str] | None = None):
        """β for a batch of prompts.

        Args:
            context_embedding: (B, H) last-layer hidden state at each prompt's last token.
            ppl: (B,) perplexity of each prompt (> 0). Alternatively pass ``log_ppl`` (B,), the mean
                token NLL, which avoids an exp/log round trip; exactly one of the two is needed.
            return_details: also return a dict with ``f`` (B,) and ``ppl_term`` (B,); with ``use_ppl_approx``
                also ``log_ppl_approx`` (B,) and ``beta_exact`` (B,), the β the exact log PPL would give.
            domains: B domain names, one per prompt: needed by ``per_domain(_learned)``, ignored by the other modes.

        Returns:
            β (B,) float32, in [beta_min, beta_max] for finite input; or ``(β, details)`` when ``return_details``.
        """
        if (ppl is None) == (log_ppl is None):
            raise LbdpoError("BetaHead.forward needs exactly one of `ppl` or `log_ppl`")
        if log_ppl is None:
            if torch.any(ppl <= 0):  # NaN passes through (see the module docstring)
                raise LbdpoError("BetaHead.forward: perplexity must be > 0")
            log_ppl = torch.log(ppl)
        log_ppl = log_ppl.to(device=self._anchor.device, dtype=torch.float32)
        batch = log_ppl.shape[0]

        if self.fixed:
            beta = self.w.expand(batch).float() if self.domain_table is None else self.domain_table(
                domains, batch, self.w.device)
            details = {"f": torch.ones_like(beta), "ppl_term": torch.ones_like(beta)}
            return (beta, details) if return_details else beta

        if self.config.detach_ppl:
            log_ppl = log_ppl.detach()
        f = self.context_factor(context_embedding)
        details = {"f": f}
        if self.ppl_net is not None:  # β from the approximation ℓ̂ (trained only by auxiliary_loss)
            details["log_ppl_approx"] = self.approximate_log_ppl(context_embedding, log_ppl)
            t = self.ppl_term(details["log_ppl_approx"].detach().clamp(min=0.0))
        else:
            t = self.ppl_term(log_ppl)
        if not self.init_flags["w_initialized"]:  # w_init=auto, on the first finite batch (no device read after)
            auto_init_w(self, t * f)
        beta = self.combine(t, f)
        if self.ppl_net is not None:  # what the exact log PPL would have given, to compare rankings
            details["beta_exact"] = self.combine(self.ppl_term(log_ppl), f).detach()
        details["ppl_term"] = t
        return (beta, details) if return_details else beta

    def combine(self, t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """β = clamp(w · T · f), normalised to mean target_beta under ``batch_mean``: (B,), (B,) → (B,)."""
        g = self.current_w() * t * f  # β before normalisation and clamping
        if self.config.normalize == "batch_mean":
            g = self.config.target_beta * g / g.mean()
        return g.clamp(self.config.beta_min, self.config.beta_max)

    def approximate_log_ppl(self, context_embedding: torch.Tensor, log_ppl: torch.Tensor) -> torch.Tensor:
        """ℓ̂ = NN_ppl(LayerNorm(h)): (B, H) → (B,). h is always detached (the approximation never trains the
        policy). On the first finite batch the output bias is shifted so that mean ℓ̂ = mean log PPL."""
        approx = self.ppl_net(context_embedding.to(self._anchor.dtype).detach()).squeeze(-1)
        if not self.init_flags["ppl_net_initialized"]:
            approx = init_ppl_approx(self, approx, log_ppl)
        return approx

    def auxiliary_loss(self, log_ppl: torch.Tensor, log_ppl_approx: torch.Tensor | None) -> torch.Tensor:
        """ppl_approx_loss_weight · mean (ℓ̂ − log PPL)², the exact log PPL detached; 0 without the approximation."""
        if log_ppl_approx is None:
            return torch.zeros((), device=self._anchor.device)
        return self.config.ppl_approx_loss_weight * (log_ppl_approx - log_ppl.detach()).pow(2).mean()

    def regularization_loss(self) -> torch.Tensor:
        """w_prior_weight · (log w − log w_init)², a scalar (0 when disabled, fixed or not trainable)."""
        if self.fixed or not self.config.w_trainable or self.config.w_prior_weight == 0:
            return torch.zeros((), device=self._anchor.device)
        log_w = self.log_w if self.log_w is not None else torch.log(self.w.clamp(min=1e-12))
        return self.config.w_prior_weight * ((log_w - torch.log(self.w_init_value)) ** 2).sum()

    def extra_repr(self) -> str:
        c = self.config
        if self.fixed:
            return describe(c) or f"mode={c.mode}, beta={c.beta}"
        return (f"ppl_transform={c.ppl_transform}, net={c.context_net_type}, epsilon={c.epsilon}, w_trainable="
                f"{c.w_trainable}, w_param={c.w_param}, w_init={c.w_init}, normalize={c.normalize}, objective={c.objective}")


__all__ = ["BetaHead", "BetaHeadConfig", "DynamicBetaDPOModel", "PPL_TRANSFORMS"]
