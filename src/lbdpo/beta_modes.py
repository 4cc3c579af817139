"""The β modes that are not the learnable formula and not β-DPO: a β per domain, fixed or learned, and one global β(t).

:class:`lbdpo.beta_head.BetaHead` runs them (``mode=per_domain`` / ``per_domain_learned`` / ``schedule``); this module
holds what is particular to each: the validation of their keys, the β they give, reading a schedule from another run,
and the one-line description the banner, the model card and the evaluation report print. The learned table of
``per_domain_learned`` (one log β per training domain) is :mod:`lbdpo.beta_domains`, which also serves ``per_domain``.

``per_domain`` — β_i = ``domain_betas[domain_i]``, or ``beta`` for a domain the map does not list, fixed for the
whole run (no parameters). The domain of pair i comes with its batch: the collator's ``domain`` list, which the data
loader tags on every pair (a source's own ``domain`` column, else its file name); :meth:`DynamicBetaDPOModel.forward`
passes it to the head, so training, the held-out evaluation during training and ``evaluate.py`` give a pair the same
β. A batch without domains is an error (:func:`domain_beta`), as is a map naming a domain the training data does not
have (:func:`check_domains_present`, a typo would otherwise silently give the default).

``per_domain_learned`` — one β per training domain, learned (β_d = exp(θ_d), clamped), starting at ``domain_betas[d]``
where listed (optional here), else at ``beta``; ``domains`` is filled in from the training data and saved with the
head. Its table, gradients, unseen-domain fallback and logging: :mod:`lbdpo.beta_domains`.

``schedule`` — one β for every pair, β(t) piecewise linear in the optimizer step t between knots
``[[t₀, β₀], [t₁, β₁], ...]`` (``schedule``; steps increasing), constant before the first and after the last knot.
t is the step being computed: 1 for the first optimizer step, as ``metrics.jsonl`` numbers its lines. The trainer
calls :meth:`BetaHead.set_step` before each step, so a resumed run continues with the β of its next step; the head
keeps t and β(t) in buffers (``schedule_step``, ``w``) that checkpoints save, so an evaluation after step t (during
training or from the checkpoint) uses β(t), the last step's β. ``schedule_from`` replays another run instead:
:func:`read_beta_schedule` turns its ``metrics.jsonl``'s ``beta/mean`` at every logged step into the knots, so a run
with the same steps uses at step t the mean β the other run used at its step t (its global batch's mean).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import LbdpoError, MissingFileError

LEARNED_MODE = "per_domain_learned"  # one learned β per training domain (lbdpo.beta_domains)
RULE_MODES = ("per_domain", "schedule", LEARNED_MODE)  # the BetaHead modes this module defines
RULE_KEYS = {"domain_betas": ("per_domain", LEARNED_MODE), "domains": (LEARNED_MODE,), "schedule": ("schedule",),
             "schedule_from": ("schedule",)}  # key → the modes that read it


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def validate(config: Any) -> None:
    """The keys of ``per_domain`` / ``schedule`` on a :class:`BetaHeadConfig` (duck-typed: ``mode``,
    ``domain_betas``, ``schedule``, ``schedule_from``); an :class:`LbdpoError` naming the key otherwise. Each key is
    refused under another mode: set there, it would be ignored silently."""
    for key, modes in RULE_KEYS.items():
        if getattr(config, key, None) is not None and config.mode not in modes:
            raise LbdpoError(f"beta_head.{key} is read only by beta_head={' or '.join(modes)}, not mode="
                             f"{config.mode}: use beta_head={modes[0]} or set beta_head.{key}=null")
    if config.mode == "per_domain":
        betas = config.domain_betas
        if not isinstance(betas, dict) or not all(isinstance(k, str) and _positive(v) for k, v in betas.items()):
            raise LbdpoError(f"beta_head.domain_betas={betas!r}: beta_head=per_domain needs a map of each listed "
                             "domain to a finite β > 0, e.g. 'beta_head.domain_betas={en_garbled: 1.0}' (unlisted "
                             "domains get beta_head.beta)")
    if config.mode == LEARNED_MODE:
        validate_learned(config)
    if config.mode == "schedule":
        if config.schedule is None and not config.schedule_from:
            raise LbdpoError("beta_head=schedule needs beta_head.schedule=[[step, β], ...] or "
                             "beta_head.schedule_from=<run folder or its metrics.jsonl>")
        if config.schedule is not None:
            check_knots(config.schedule)


def validate_learned(config: Any) -> None:
    """``per_domain_learned``'s keys: ``domain_betas`` null or a map of domain → initial β, ``domains`` null or the
    names, every initial β (those and ``beta``) inside [beta_min, beta_max] (outside, the clamp would leave it no
    gradient), and no ``w_prior_weight`` (there is no w to pull)."""
    betas, domains = config.domain_betas, config.domains
    if betas is not None and not (isinstance(betas, dict) and all(isinstance(k, str) and _positive(v)
                                                                  for k, v in betas.items())):
        raise LbdpoError(f"beta_head.domain_betas={betas!r}: beta_head=per_domain_learned takes null (every domain "
                         "starts at beta_head.beta) or a map of domain → initial β > 0, e.g. {en_plain: 0.05}")
    if domains is not None and not (isinstance(domains, (list, tuple)) and domains and len(set(domains)) == len(domains)
                                    and all(isinstance(d, str) for d in domains)):
        raise LbdpoError(f"beta_head.domains={domains!r} must be null (filled in from the training data) or a list of "
                         "distinct domain names")
    low, high = config.beta_min, config.beta_max
    if not (_positive(low) and _positive(high) and low < high):
        raise LbdpoError(f"beta_head.beta_min={low!r} and beta_head.beta_max={high!r} must satisfy 0 < beta_min < "
                         "beta_max")
    for key, value in [("beta", config.beta), *((f"domain_betas.{k}", v) for k, v in (betas or {}).items())]:
        if not (_positive(value) and low <= value <= high):
            raise LbdpoError(f"beta_head.{key}={value!r}: an initial β of beta_head=per_domain_learned must be a number "
                             f"in [beta_min, beta_max] = [{low:g}, {high:g}] (at the clamp it gets no gradient)")
    if float(config.w_prior_weight) != 0:
        raise LbdpoError(f"beta_head.w_prior_weight={config.w_prior_weight} is not read by beta_head=per_domain_learned "
                         "(it has no w): set beta_head.w_prior_weight=0")


def check_knots(knots: Any, origin: str = "beta_head.schedule") -> None:
    """``[[t, β], ...]``: at least one knot, steps ≥ 0 and strictly increasing, each β finite and > 0."""
    ok = isinstance(knots, (list, tuple)) and len(knots) > 0 and all(
        isinstance(k, (list, tuple)) and len(k) == 2 and isinstance(k[0], (int, float)) and not isinstance(k[0], bool)
        and math.isfinite(k[0]) and k[0] >= 0 and _positive(k[1]) for k in knots)
    if not ok or any(b[0] <= a[0] for a, b in zip(knots, knots[1:])):
        raise LbdpoError(f"{origin}={knots!r} must be a list of [step, β] knots, steps ≥ 0 and increasing, each β "
                         "finite and > 0, e.g. [[0, 0.1], [437, 0.3]]")


def interpolate(knots: Sequence[Sequence[float]], step: float) -> float:
    """β(step) of the piecewise-linear schedule through ``knots`` (K, 2); constant outside [t₀, t_{K−1}]."""
    if step <= knots[0][0]:
        return float(knots[0][1])
    for (t0, b0), (t1, b1) in zip(knots, knots[1:]):
        if step <= t1:
            return float(b0 + (b1 - b0) * (step - t0) / (t1 - t0))
    return float(knots[-1][1])


def read_beta_schedule(source: str | Path) -> list[list[float]]:
    """The knots ``[[step, beta/mean], ...]`` of another run, from its ``metrics.jsonl`` (every training line that
    logged ``beta/mean``; the last line of a step wins, as in a resumed run's file).

    Args:
        source: a run folder, which must hold a finished run (``checkpoints/final`` or ``eval.json`` beside its
            ``metrics.jsonl``: the experiment runner's run and results folders both qualify), or a ``metrics.jsonl``
            file, read as it is.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not ((path / "checkpoints" / "final").is_dir() or (path / "eval.json").is_file()):
            raise LbdpoError(f"beta_head.schedule_from={source}: that run has not finished (no checkpoints/final or "
                             "eval.json in it), so its β curve is incomplete; finish it first (the experiment runner "
                             "runs arms in file order: list the replayed arm before this one)")
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise MissingFileError(f"beta_head.schedule_from={source}: {path} does not exist; give a run folder or its "
                               "metrics.jsonl")
    by_step: dict[int, float] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        beta = row.get("beta/mean") if isinstance(row, dict) else None
        if isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0 and "step" in row:
            by_step[int(row["step"])] = float(beta)
    if not by_step:
        raise LbdpoError(f"beta_head.schedule_from={source}: {path} has no training line with a finite beta/mean")
    knots = [[step, by_step[step]] for step in sorted(by_step)]
    check_knots(knots, origin=f"beta_head.schedule_from={source}")
    return knots


def check_pair_domains(domains: Sequence[str] | None, n: int, mode: str = "per_domain") -> None:
    """A batch of n pairs under a per-domain mode carries n domain names."""
    if domains is None:
        raise LbdpoError(f"beta_head={mode} needs each pair's domain, and this batch has none: batches from the "
                         "data loader carry a `domain` list (every source is tagged); a direct call passes domains=")
    if len(domains) != n:
        raise LbdpoError(f"beta_head={mode}: {len(domains)} domains for {n} pairs")


def domain_beta(domain_betas: dict[str, float], default: float, domains: Sequence[str] | None, n: int,
                device: torch.device) -> torch.Tensor:
    """(n,) float32 β of ``per_domain``: ``domain_betas[d]`` for each pair's domain d, ``default`` if unlisted."""
    check_pair_domains(domains, n)
    return torch.tensor([float(domain_betas.get(d, default)) for d in domains], dtype=torch.float32, device=device)


def check_domains_present(domain_betas: dict[str, float], present: set[str]) -> None:
    """Every domain of ``beta_head.domain_betas`` occurs among the training pairs' domains ``present``."""
    unknown = sorted(set(domain_betas) - present)
    if unknown:
        raise LbdpoError(f"beta_head.domain_betas names {unknown}, which no training pair has; the training domains "
                         f"are {sorted(present)} (a typo? unlisted domains get beta_head.beta)")


def describe(config: Any, step: int | None = None) -> str | None:
    """One line for the banner, model card and evaluation report: ``per_domain`` / ``schedule``; None otherwise."""
    if config.mode == "per_domain":
        listed = ", ".join(f"{d} {b:g}" for d, b in sorted((config.domain_betas or {}).items())) or "none listed"
        return f"β per domain: {listed}; other domains {config.beta:g}"
    if config.mode == LEARNED_MODE:
        start = ", ".join(f"{d} {b:g}" for d, b in sorted((config.domain_betas or {}).items()))
        names = ", ".join(config.domains) if config.domains else "the training domains, not bound yet"
        return (f"β per domain, learned (one log β per domain, objective={config.objective}): {names}; starting at "
                f"{start + ', others ' if start else ''}{config.beta:g}; a domain not trained on gets its starting β")
    if config.mode == "schedule":
        knots = config.schedule
        shape = (f"{len(knots)} knots, β {knots[0][1]:.4g} at step {knots[0][0]:g} → {knots[-1][1]:.4g} at step "
                 f"{knots[-1][0]:g}") if knots else "knots not read yet"
        where = f" from {config.schedule_from}" if config.schedule_from else ""
        at = f"; at step {step}: {interpolate(knots, step):.4g}" if step is not None and knots else ""
        return f"β(t) piecewise linear in the step{where} ({shape}){at}"
    return None
