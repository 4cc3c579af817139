"""β-DPO (Wu et al., "β-DPO: Direct Preference Optimization with Dynamic β", NeurIPS 2024): one β per batch from
the batch's margin statistics, and margin-guided filtering of pairs. The peer method every lbdpo comparison includes.

For a training batch of N pairs (gathered over all processes), with the detached implicit-reward margins

    M_i = (log πθ(yw|x) − log πref(yw|x)) − (log πθ(yl|x) − log πref(yl|x))          (B,) per process

1. moving averages of the batch statistics, updated first (γ = ``momentum``; both start at 0, as in the authors'
   code):  M₀ ← γ·M₀ + (1 − γ)·mean(M),   σ ← γ·σ + (1 − γ)·std(M)   (std unbiased, as theirs);
2. filtering (``filter_fraction`` ρ > 0): keep ⌊(1 − ρ)·N⌋ pairs drawn without replacement with probabilities
   ∝ exp(−½·((M_i − M₀)/σ)²), so pairs whose margin is far from the running mean (outliers, likely noise)
   are dropped more often; the loss is the mean over the kept pairs;
3. β_batch = β₀ · [1 + α·(mean_{kept} M − M₀)], clamped at ≥ ``beta_floor``, detached (no gradient into β).

In evaluation (``update=False``) nothing is updated or filtered: β = β₀·[1 + α·(mean_batch M − M₀)] with the
running M₀. The draws use their own generator, seeded by ``seed`` and the update count (a buffer), so every process
draws the same pairs and a resumed run draws what the uninterrupted one would have. Defaults are the authors'
README example: β₀ = 0.1, α = 0.6, ρ = 0.2; γ = 0.9 from their code.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import LbdpoError


BETA_FLOOR = 1e-3  # the authors' clamp of β_batch (their code: beta_used.clamp(min=1e-3))


def gather_all(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B,) from each process → ((N,) all of them in rank order, this process's offset). Equal B on all processes."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]


def check_beta_dpo_options(alpha: float, filter_fraction: float, momentum: float) -> None:
    """β-DPO's keys of the ``beta_head`` group: an :class:`LbdpoError` naming the bad one."""
    if not 0 <= float(filter_fraction) < 1:
        raise LbdpoError(f"beta_head.beta_dpo_filter={filter_fraction!r} must be in [0, 1)")
    if not 0 <= float(momentum) < 1:
        raise LbdpoError(f"beta_head.beta_dpo_momentum={momentum!r} must be in [0, 1)")
    if not math.isfinite(float(alpha)):
        raise LbdpoError(f"beta_head.beta_dpo_alpha={alpha!r} must be a finite number")


class BetaDPO(nn.Module):
    """The batch-level β of β-DPO (see the module docstring); state in buffers, so checkpoints resume it."""

    def __init__(self, beta: float, alpha: float = 0.6, filter_fraction: float = 0.2, momentum: float = 0.9,
                 beta_floor: float = BETA_FLOOR, seed: int = 0):
        super().__init__()
        self.beta, self.alpha, self.filter_fraction = float(beta), float(alpha), float(filter_fraction)
        self.momentum, self.beta_floor, self.seed = float(momentum), float(beta_floor), int(seed)
        self.register_buffer("margin_mean", torch.zeros(()))  # M₀
        self.register_buffer("margin_std", torch.zeros(()))  # σ
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # training batches seen

    @torch.no_grad()
    def forward(self, margins: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """margins (B,) → (β (B,), every entry β_batch; keep (B,) float, 1 for the pairs the loss averages)."""
        local = margins.detach().float()
        everything, offset = gather_all(local)
        keep = torch.ones_like(everything)
        if update and bool(torch.isfinite(everything).all()):  # a non-finite batch is skipped by the trainer
            g = self.momentum
            std = everything.std() if everything.numel() > 1 else torch.zeros((), device=everything.device)
            self.margin_mean.mul_(g).add_((1 - g) * everything.mean())
            self.margin_std.mul_(g).add_((1 - g) * std)
            if self.filter_fraction > 0 and everything.numel() > 1:
                keep = self.filter_mask(everything)
            self.updates += 1
        kept_mean = everything[keep.bool()].mean()
        beta = (self.beta * (1 + self.alpha * (kept_mean - self.margin_mean))).clamp(min=self.beta_floor)
        return beta.expand(local.shape[0]).clone(), keep[offset:offset + local.shape[0]]

    def filter_mask(self, margins: torch.Tensor) -> torch.Tensor:
        """(N,) → (N,) 0/1: ⌊(1 − ρ)·N⌋ pairs drawn without replacement ∝ exp(−½((M_i − M₀)/σ)²)."""
        n_keep = max(1, int(margins.numel() * (1 - self.filter_fraction)))
        weights = torch.exp(-0.5 * ((margins - self.margin_mean) / self.margin_std.clamp(min=1e-8)).pow(2))
        if not bool(torch.isfinite(weights).all()) or float(weights.sum()) <= 0:  # every pair ≫ σ away: uniform
            weights = torch.ones_like(margins)
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + int(self.updates))
        chosen = torch.multinomial(weights.cpu(), n_keep, replacement=False, generator=generator)
        keep = torch.zeros_like(margins)
        keep[chosen.to(margins.device)] = 1.0
        return keep

    def extra_repr(self) -> str:
        return f"beta={self.beta}, alpha={self.alpha}, filter_fraction={self.filter_fraction}, momentum={self.momentum}"
