"""β by each pair's domain: ``beta_head=per_domain`` (a fixed map) and ``beta_head=per_domain_learned`` (learned).

:class:`lbdpo.beta_head.BetaHead` hands both to :class:`DomainBetas`; :mod:`lbdpo.beta_modes` checks their keys and
describes them. A pair's domain comes with its batch, the collator's ``domain`` list, which the data loader tags on
every pair (a source's own ``domain`` column, else its file name); :meth:`DynamicBetaDPOModel.forward` passes it to the
head, so training, the held-out evaluation during training and ``evaluate.py`` give a pair the same β.

``per_domain_learned``: one β per training domain d, learned,

    β_d = clamp(exp(θ_d), beta_min, beta_max),   θ ∈ R^D (``log_beta``),   β_i = β_{domain(i)}

positive by construction, clamped as every head's β is; θ_d starts at log ``domain_betas[d]`` where the map lists d,
else at log ``beta``. So ∂β_i/∂θ_d = β_d·[domain(i) = d] (0 at a clamp): under ``objective=dpo`` the training loss
gives ∂L/∂θ_d = Σ_{i ∈ d} (∂L/∂β_i)·β_d; under ``objective=validation`` the look-ahead hypergradient
(:func:`lbdpo.train.beta_validation.hypergradient`) reaches θ through the same forward on the step's recorded domains.
Either way a domain with no pair in the step gets a gradient of exactly 0. θ trains at ``trainer.beta_head_lr``
without weight decay (the optimizer's group of w).

The domains are the training split's domain names, sorted, bound once at set-up, before the optimizer is built
(:func:`bind_domains`), and written into the head's config (``domains``): ``beta_head_config.json`` saves them, so a
checkpoint or a saved model folder rebuilds the same table before its θ is loaded. A domain no training pair had (seen
at evaluation) gets the β it would have started at, ``domain_betas[d]`` if listed (a training run refuses a listed
domain that is not in its data, so there: ``beta``), not the mean of the learned β: the head has no evidence about
it; one warning per such domain names it and the training domains.

Logged: ``beta_head/beta/<domain>``, each domain's β of the step's forward (before its update, as ``beta_head/w``:
the β the step's pairs trained at), read with the rest of the step in its one device read
(:func:`lbdpo.train.step_metrics.read_step`); per pair in ``pairs.jsonl``; ``eval/<domain>/beta/mean`` at evaluation,
as for every head. ``beta_head/w`` is the constant ``beta`` (the head has no w). :func:`domain_metrics` gives a head's
current table (e.g. a loaded checkpoint's).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .beta_modes import LEARNED_MODE, check_domains_present, check_pair_domains, domain_beta
from .errors import LbdpoError

log = logging.getLogger(__name__)
DOMAIN_MODES = ("per_domain", LEARNED_MODE)  # the modes whose β is the pair's domain's


class DomainBetas(nn.Module):
    """β of each pair from its domain name; ``per_domain``: the fixed map, no parameters; ``per_domain_learned``:
    ``log_beta`` (D,), one log β per training domain (after :meth:`bind`, or at once when ``config.domains`` is set).

    Args:
        config: the head's :class:`~lbdpo.beta_head.BetaHeadConfig` itself (not a copy): :meth:`bind` writes the
            training domains into it, which the head's saved config keeps.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.learn = config.mode == LEARNED_MODE
        self.index: dict[str, int] = {}  # domain → its entry of log_beta, in sorted order
        self.log_beta: nn.Parameter | None = None
        self._warned: set[str] = set()  # unseen domains already reported
        if self.learn and config.domains is not None:
            self.bind(config.domains)

    def initial_beta(self, domain: str | None) -> float:
        """The β a domain starts at: ``domain_betas[domain]`` if listed, else ``beta``."""
        return float((self.config.domain_betas or {}).get(domain, self.config.beta))

    def bind(self, domains: Iterable[str], device: torch.device | str | None = None) -> None:
        """Create ``log_beta``, one entry per name of ``domains`` (sorted), at each domain's initial β; record the
        names in ``config.domains``. A head already bound (or a config listing domains) must name the same set."""
        names = sorted(set(domains))
        if not names or not all(isinstance(d, str) for d in names):
            raise LbdpoError(f"beta_head=per_domain_learned needs the training pairs' domain names, got {names}: "
                             "every source is tagged with one (its `domain` column, else its file name)")
        bound = list(self.index) if self.log_beta is not None else self.config.domains
        if bound is not None:
            if sorted(bound) != names:
                raise LbdpoError(f"beta_head.domains={sorted(bound)} but the training pairs' domains are {names}: "
                                 "set beta_head.domains=null (it is filled in from the training data)")
            if self.log_beta is not None:
                return
        init = torch.tensor([self.initial_beta(d) for d in names], dtype=torch.float32, device=device)
        self.log_beta = nn.Parameter(torch.log(init))  # θ_d = log β_d at the start
        self.index = {d: i for i, d in enumerate(names)}
        self.config.domains = names

    def betas(self) -> torch.Tensor:
        """β_d = clamp(exp(θ_d)) of every bound domain, in ``index`` order: (D,) float32, differentiable in θ."""
        return torch.exp(self.log_beta).clamp(self.config.beta_min, self.config.beta_max)

    def forward(self, domains: Sequence[str] | None, n: int, device: torch.device) -> torch.Tensor:
        """(n,) float32 β of n pairs from their domains (``n`` names); ``device``: where a fixed β goes."""
        if not self.learn:
            return domain_beta(self.config.domain_betas, self.config.beta, domains, n, device)
        check_pair_domains(domains, n, LEARNED_MODE)
        unseen = [d for d in domains if d not in self.index]
        if unseen:
            self._report(unseen)
            fallback = _to(torch.tensor([self.initial_beta(d) for d in domains], dtype=torch.float32), device)
            if self.log_beta is None:  # not bound: every domain is unseen
                return fallback
        table = self.betas()
        beta = table[_to(torch.tensor([self.index.get(d, 0) for d in domains]), table.device)]
        if unseen:
            beta = torch.where(_to(torch.tensor([d in self.index for d in domains]), table.device), beta,
                               fallback.to(table.device))
        return beta

    def _report(self, unseen: Sequence[str]) -> None:
        for domain in dict.fromkeys(unseen):
            if domain not in self._warned:
                self._warned.add(domain)
                log.warning("beta_head=per_domain_learned: domain %r is not among the head's training domains %s; its "
                            "pairs get the β it would have started at, %g", domain, list(self.index),
                            self.initial_beta(domain))

    def extra_repr(self) -> str:
        return f"mode={self.config.mode}, domains={list(self.index) if self.learn else None}"


def _to(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the device's queued work (non_blocking; the pageable
    source is staged before the call returns, so it may be freed at once)."""
    return host.to(device, non_blocking=True)


def bind_domains(head, present: set[str]) -> None:
    """At set-up, given the training split's domain names: under ``per_domain`` and ``per_domain_learned`` a domain of
    ``domain_betas`` that no training pair has is refused (a typo would otherwise silently get ``beta``), and under
    ``per_domain_learned`` the head's table gets one log β per training domain. A no-op for the other modes."""
    config = head.config
    if config.mode not in DOMAIN_MODES:
        return
    check_domains_present(config.domain_betas or {}, present)
    if config.mode == LEARNED_MODE:
        head.domain_table.bind(present, device=head.w.device)


def domain_metrics(head, gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float]:
    """``beta_head/beta/<domain>``: each domain's current β under ``per_domain_learned`` (one device read: for
    inspecting a head, not used in the training step); {} for every other head. ``gather``: the full tensor of a sharded parameter (:func:`lbdpo.train.sharded.full`)."""
    table = getattr(head, "domain_table", None)
    if table is None or table.log_beta is None:
        return {}
    with torch.no_grad():
        values = gather(table.betas()).tolist()
    return {f"beta_head/beta/{d}": float(v) for d, v in zip(table.index, values)}


__all__ = ["DOMAIN_MODES", "DomainBetas", "bind_domains", "domain_metrics"]
