"""The metrics of one optimizer step: read from the device once, logged, checked for signs of a broken run.

On a GPU a small model's step is bound by the host, and every read of a device value (``.item()``, ``.cpu()``,
``float(t)``, ``if t:``) makes the host wait until all queued work is done. So everything a step reports — the NaN
guard's flag, the gradient norms, the real-token count, the deferred batch checks
(:class:`lbdpo.logprobs.DeferredChecks`), β-DPO's running statistics, the head's w, and every per-pair value — is
stacked into one vector on the device, gathered across processes in one collective (the one the guard's decision
needs anyway) and read once (:func:`read_step`); :func:`log_step` then works on host values. The logged w
(``beta_head/w``) is therefore the w of the step's forward, read before the update (the read decides whether to
update): the w that gave the step's β, as :class:`lbdpo.dpo_model.DPOOutput` reports it; a trainable w's update shows
at the next step (and in the checkpoint written after the step). The same for ``beta_head/beta/<domain>`` of the
learned per-domain head (:mod:`lbdpo.beta_domains`). ``benchmarks/host_ops.py`` counts the reads of a step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..logprobs import DeferredChecks
from ..losses import logratio_margin
from ..metrics import preference_metrics
from .setup import Run
from .sharded import full

log = logging.getLogger(__name__)
HEAD = 5  # the read's leading entries: real tokens, the guard's flag, the policy's, the head's and the total norm


@dataclass
class StepResult:
    values: dict[str, torch.Tensor]  # per-pair values of every process: host tensors (N,), in process order
    domains: list[str | None]  # this process's pairs' domain labels, in the same order
    tokens: int  # real tokens of the step, all processes together
    grad_norm: float  # global norm of all gradients before clipping
    policy_grad_norm: float  # the policy's part of it
    head_grad_norm: float  # the BetaHead's part of it
    skip: bool = False  # a non-finite loss or gradient norm on some process: the update is skipped on all
    batch_level: dict[str, float] = field(default_factory=dict)  # β-DPO's running statistics (beta_dpo/M0, /sigma)
    w: float = float("nan")  # the head's w in the step's forward: before the update (a trainable w's moves after)
    extra: dict[str, float] = field(default_factory=dict)  # more metrics of the step (beta_val/… under validation)


def read_step(accelerator: Accelerator, beta_head, bad: torch.Tensor, norms: torch.Tensor, tokens: torch.Tensor,
              per_pair: dict[str, list[torch.Tensor]], checks: DeferredChecks,
              domains: list[str | None]) -> StepResult:
    """The step's one collective and one device read.

    Args:
        bad: 0-dim, > 0 where this process's loss or gradient norm is non-finite.
        norms: (3,) the policy's, the head's and the total gradient norm (before clipping).
        tokens: 0-dim, this process's real tokens.
        per_pair: key → one (B,) tensor per micro-batch (DPOOutput.per_pair()), all on the device.
        checks: the batch checks deferred in the step's forwards.

    Raises:
        LbdpoError: a deferred batch check failed on some process (every process raises: all read the same flags).
    """
    device = accelerator.device
    level = beta_head.batch_level
    w = full(beta_head.current_w().detach())  # the forward's w, before the update (FSDP2: w's shards gathered)
    dtype = torch.float32 if device.type == "mps" else torch.float64  # exact for float32 values and token counts
    head = [tokens.to(dtype).reshape(1), bad.reshape(1), norms, checks.flags(device)]  # ← HEAD entries, then flags
    head += [level.margin_mean.reshape(1), level.margin_std.reshape(1)] if level is not None else []
    head += [w.reshape(1)]
    table = getattr(beta_head, "domain_table", None)  # per_domain_learned: each domain's β of the forward, as w
    learned = [] if table is None or table.log_beta is None else list(table.index)
    head += [full(table.betas().detach())] if learned else []
    pairs = [(k, sum(x.numel() for x in v), v[0].dtype) for k, v in per_pair.items() if v]
    # one vector (cat promotes every entry to ``dtype``), gathered: (processes, entries); then read, as lists
    local = torch.cat([torch.cat(head), *(x for k, v in per_pair.items() for x in v)])
    rows = accelerator.gather(local).reshape(accelerator.num_processes, -1).cpu().tolist()  # the read
    checks.raise_failed([sum(r[i] for r in rows) for i in range(HEAD, HEAD + len(checks))])
    mine, col = rows[accelerator.process_index], HEAD + len(checks)
    result = StepResult({}, domains, int(sum(r[0] for r in rows)), mine[4], mine[2], mine[3],
                        skip=sum(r[1] for r in rows) > 0)
    if level is not None:
        result.batch_level, col = {"beta_dpo/M0": mine[col], "beta_dpo/sigma": mine[col + 1]}, col + 2
    result.w, col = mine[col], col + 1
    result.extra.update({f"beta_head/beta/{d}": mine[col + i] for i, d in enumerate(learned)})
    col += len(learned)
    for k, n, kind in pairs:  # process-major, as accelerator.gather of each key would give
        result.values[k], col = torch.tensor([x for r in rows for x in r[col:col + n]], dtype=kind), col + n
    return result


def log_step(run: Run, result: StepResult, elapsed: float) -> dict[str, float]:
    """Log the step's metrics (computed in one place) from what :func:`read_step` read."""
    values = result.values
    metrics = preference_metrics(values) if "losses" in values and values["losses"].isfinite().all() \
        else {"loss": float("nan")}
    metrics.update({
        "beta_head/w": result.w,  # the w of this step's forward, before its update (read_step)
        **result.batch_level,
        "grad_norm/total": result.grad_norm,
        "grad_norm/policy": result.policy_grad_norm,
        "grad_norm/beta_head": result.head_grad_norm,
        "pairs_per_s": run.pairs_per_step / elapsed,
        "tokens_per_s": result.tokens / elapsed,
        "train/nonfinite_skips": run.state.nonfinite_skips,
        "epoch": run.state.epoch + run.state.batch_in_epoch * int(run.t.batch_size) / max(1, run.train_pairs),
        **result.extra,
    })
    for group in run.optimizer.param_groups:
        metrics[f"lr/{group['name']}"] = group["lr"]
    run.logger.log(run.state.step, metrics)
    if run.t.get("log_pairs"):
        run.logger.pairs(run.state.step, pair_rows(values, gather_object(result.domains)))
    check_health(run, metrics)
    if "beta" in values:
        run.logger.histogram(run.state.step, "beta/hist", values["beta"])
    return metrics


# pairs.jsonl columns: the per-pair value each name is read from (see DPOOutput)
PAIR_COLUMNS = {"beta": "beta", "log_ppl": "log_ppl", "f": "f", "loss": "losses", "kept": "kept"}


def pair_rows(values: dict[str, torch.Tensor], domains: list[str | None]) -> list[dict]:
    """One ``pairs.jsonl`` row per pair: domain, β, log PPL, f, loss, the β-free log-ratio margin
    Δ = (log πθ − log πref)(yw|x) − (log πθ − log πref)(yl|x) that β multiplies, and β-DPO's ``kept``.
    ``values``: host (N,) tensors, one entry per domain label."""
    margin = logratio_margin(values["policy_chosen_logps"], values["policy_rejected_logps"],
                             values["reference_chosen_logps"], values["reference_rejected_logps"])
    columns = {"margin": margin, **{name: values[k] for name, k in PAIR_COLUMNS.items() if k in values}}
    lists = {name: v.tolist() for name, v in columns.items()}  # one conversion a column, not one op a value
    return [{"domain": d, **{name: round(float(v[i]), 6) for name, v in lists.items()}}
            for i, d in enumerate(domains)]


def health_problems(metrics: dict[str, float], first_log_ppl: float, vocab_size: int, beta_min: float,
                    beta_max: float) -> dict[str, str]:
    """Signs that a run went wrong while its numbers stay finite: kind → message (checked at every logged step).

    A collapsed policy (e.g. ``policy_lr`` far too large) predicts near-uniformly, so its gradient vanishes and
    the loss sits at log 2 with nothing to say so; a β head pinned at a clamp for every pair learns nothing.
    """
    problems, uniform = {}, math.log(vocab_size)
    log_ppl = metrics.get("log_ppl/mean", float("nan"))
    if first_log_ppl < 0.8 * uniform and log_ppl >= 0.9 * uniform:
        problems["collapse"] = (f"policy collapsed: prompt log PPL rose from {first_log_ppl:.2f} to {log_ppl:.2f}, "
                                f"near log(vocab) = {uniform:.2f} (a uniform policy); lower trainer.policy_lr")
    if metrics.get("grad_norm/total") == 0.0 and math.isfinite(metrics.get("loss", float("nan"))):
        problems["zero_grad"] = ("the gradient norm is exactly 0: the policy no longer learns (collapsed, or every "
                                 "parameter frozen)")
    if metrics.get("beta/max", float("inf")) <= beta_min * (1 + 1e-6):
        problems["beta_min"] = f"β is at its lower clamp beta_min={beta_min:g} for every pair"
    if metrics.get("beta/min", 0.0) >= beta_max * (1 - 1e-6):
        problems["beta_max"] = f"β is at its upper clamp beta_max={beta_max:g} for every pair"
    return problems


def check_health(run: Run, metrics: dict[str, float]) -> None:
    """Warn loudly, once per kind, about :func:`health_problems`; they also go into the run's summary."""
    if run.first_log_ppl is None and math.isfinite(metrics.get("log_ppl/mean", float("nan"))):
        run.first_log_ppl = metrics["log_ppl/mean"]
    head = run.inner.beta_head.config
    vocab = run.lm.policy.get_output_embeddings().weight.shape[0]
    for kind, message in health_problems(metrics, run.first_log_ppl or float("inf"), vocab, head.beta_min,
                                         head.beta_max).items():
        if kind not in run.health:
            run.health[kind] = f"step {run.state.step}: {message}"
            log.warning("!!! %s", run.health[kind])
