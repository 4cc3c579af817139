"""The Learnable-β DPO training loop (hand-written, on 🤗 Accelerate), in phases that each fit one screen:

    setup        models, data, reference, optimizer/schedule, resume, logger  →  a Run  (:mod:`.setup`)
    loop         optimizer_step (forward, backward, NaN guard, clip, update) → log_step → eval / save
    finish       final eval, checkpoints/final, summary

Entry point: :func:`train`, called by ``train.py`` with the composed Hydra config.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..dpo_model import PER_PAIR_KEYS
from ..errors import RunStateError
from ..losses import logratio_margin
from ..metrics import metrics_by_domain, preference_metrics
from .checkpoint import prune_checkpoints, save_checkpoint
from .run_dir import owned_run_dir
from .run_logging import format_eval
from .setup import Run, setup
from .sharded import full, gather_full_state, is_sharded

log = logging.getLogger(__name__)


def grad_norm(params, device: torch.device | str | None = None) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params``: a float32 0-dim tensor on ``device``, not read (no device
    sync); 0 when none has a gradient. Under FSDP2 (DTensor gradients) each process's shards are normed locally
    and the parts combined across processes: a collective, so every process must call it with the same parameters."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    groups: dict = {}
    for g in grads:  # one group per device mesh (FSDP2's sharded gradients), one for plain tensors
        groups.setdefault(getattr(g, "device_mesh", None), []).append(g)
    norms = [full(torch.nn.utils.get_total_norm(group)).float() for group in groups.values()]
    return torch.linalg.vector_norm(torch.stack([n.to(device or norms[0].device) for n in norms]))


@torch.no_grad()
def clip_grads_to_norm(params, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients by min(1, max_norm / (total_norm + 1e-6)), as ``torch.nn.utils.clip_grad_norm_`` does,
    given the norm already computed (no second pass over the gradients, no device sync). A DTensor gradient
    (FSDP2) is scaled through its local shard: the factor is the same on every process."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            by_device.setdefault(local.device, []).append(local)
    for device, grads in by_device.items():
        torch._foreach_mul_(grads, coef.to(device))


@torch.no_grad()
def evaluate_pairs(model, loader, accelerator: Accelerator) -> dict[str, float]:
    """Held-out preference metrics (``eval/…``), overall and per domain (``eval/<domain>/…``)."""
    model.eval()
    gathered: dict[str, list[torch.Tensor]] = {k: [] for k in PER_PAIR_KEYS}
    domains: list[str] = []
    for batch in loader:
        for k, v in model(batch).per_pair().items():
            gathered[k].append(accelerator.gather_for_metrics(v))
        if "domain" in batch:
            domains.extend(accelerator.gather_for_metrics(batch["domain"], use_gather_object=True))
    model.train()
    if not gathered["losses"]:
        return {}
    values = {k: torch.cat(v).cpu() for k, v in gathered.items() if v}
    metrics = {f"eval/{k}": v for k, v in preference_metrics(values).items()}
    if domains and len(set(domains)) > 1:
        for domain, sub in metrics_by_domain(values, domains).items():
            metrics.update({f"eval/{domain}/{k}": v for k, v in sub.items()})
    return metrics


# ------------------------------------------------------------------------------------------------
# One optimizer step, its metrics, evaluation and checkpoints
# ------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    per_pair: dict[str, list[torch.Tensor]]  # this process's per-pair values, one tensor per micro-batch
    domains: list[str | None]  # this process's pairs' domain labels, in the same order
    tokens: int  # real tokens this process saw
    grad_norm: float  # global norm of all gradients before clipping
    policy_grad_norm: float  # the policy's part of it
    head_grad_norm: float  # the BetaHead's part of it


def optimizer_step(run: Run) -> StepResult:
    """Forward and backward over ``gradient_accumulation_steps`` micro-batches, then one update.

    NaN/inf guard: a non-finite loss or gradient norm on any process skips the update on all of them
    (counted in ``state.nonfinite_skips`` on each); training stops after ``max_consecutive_nonfinite`` in a row.
    Every process runs the same collectives whatever its loss: a non-finite loss is still backpropagated (its
    non-finite gradients, all-reduced by DDP or reduce-scattered by FSDP, reach every process; they are discarded),
    and the skip is decided from a flag reduced across processes, so all processes decide alike.
    """
    t, accelerator, state = run.t, run.accelerator, run.state
    device = accelerator.device
    micro_batches = int(t.gradient_accumulation_steps)
    per_pair: dict[str, list[torch.Tensor]] = {k: [] for k in PER_PAIR_KEYS}
    domains: list[str | None] = []
    tokens, loss_finite = 0, torch.ones((), dtype=torch.bool, device=device)
    run.inner.beta_head.set_step(state.step + 1)  # beta_head=schedule: β(t) of this step (1-based, as logged)
    for micro in range(micro_batches):
        batch = next(run.batches)
        sync = micro == micro_batches - 1
        with accelerator.no_sync(run.model) if not sync else contextlib.nullcontext():
            out = run.model(batch)
            # always backward (never branch on this process's loss): DDP's all-reduce and FSDP's reduce-scatter
            # are collectives that every process must enter
            accelerator.backward(out.loss / micro_batches)
        loss_finite &= torch.isfinite(out.loss.detach()).to(device)
        for k, v in out.per_pair().items():
            per_pair[k].append(v)
        domains += batch.get("domain") or [None] * len(out.losses)
        tokens += int(batch["attention_mask"].sum())

    params = [p for p in run.model.parameters() if p.requires_grad]
    head_ids = {id(p) for p in run.inner.beta_head.parameters()}
    policy_params = [p for p in params if id(p) not in head_ids]
    head_params = [p for p in params if id(p) in head_ids]
    max_norm = float(t.max_grad_norm)
    accelerator.unscale_gradients()  # fp16: the true gradients before any norm (a no-op otherwise)
    # one pass over the gradients: the two groups' norms give the total, which clips all of them
    group_norms = torch.stack([grad_norm(policy_params, device), grad_norm(head_params, device)])
    total_norm = torch.linalg.vector_norm(group_norms)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # the engine holds the gradients and clips
        engine_norm = accelerator.clip_grad_norm_(params, max_norm or float("inf"))
        if engine_norm is not None:
            total_norm = torch.as_tensor(engine_norm, dtype=torch.float32, device=device)
    elif max_norm > 0:
        clip_grads_to_norm(params, max_norm, total_norm)
    bad = (~(loss_finite & torch.isfinite(total_norm))).float()
    # one collective for the decision, one device read for it and the norms
    bad = accelerator.reduce(bad.reshape(1), reduction="sum")
    skip, policy_norm, head_norm, total = torch.cat([bad.reshape(1), group_norms, total_norm.reshape(1)]).tolist()
    if skip > 0:
        run.optimizer.zero_grad(set_to_none=True)
        if accelerator.scaler is not None:  # fp16: the unscaled-but-unused gradients must reset the scaler
            accelerator.scaler.update()
        state.nonfinite_skips += 1
        state.nonfinite_in_row += 1
        log.warning("step %d: non-finite loss or gradient, update skipped on every process (%d in a row)",
                    state.step + 1, state.nonfinite_in_row)
        if state.nonfinite_in_row >= int(t.max_consecutive_nonfinite):
            raise RunStateError(
                f"{state.nonfinite_in_row} consecutive non-finite steps (trainer.max_consecutive_nonfinite="
                f"{t.max_consecutive_nonfinite}); lower the learning rates or check the data")
    else:
        state.nonfinite_in_row = 0
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return StepResult(per_pair, domains, tokens, total, policy_norm, head_norm)


def log_step(run: Run, result: StepResult, elapsed: float) -> dict[str, float]:
    """Gather the step's per-pair values across processes and log its metrics (computed in one place)."""
    accelerator = run.accelerator
    values = {k: accelerator.gather(torch.cat(v)).cpu() for k, v in result.per_pair.items() if v}
    tokens = accelerator.reduce(torch.tensor(result.tokens, device=accelerator.device), "sum").item()
    metrics = preference_metrics(values) if "losses" in values and values["losses"].isfinite().all() \
        else {"loss": float("nan")}
    metrics.update({
        "beta_head/w": float(full(run.inner.beta_head.current_w().detach())),
        **batch_level_metrics(run.inner.beta_head),
        "grad_norm/total": result.grad_norm,
        "grad_norm/policy": result.policy_grad_norm,
        "grad_norm/beta_head": result.head_grad_norm,
        "pairs_per_s": run.pairs_per_step / elapsed,
        "tokens_per_s": tokens / elapsed,
        "train/nonfinite_skips": run.state.nonfinite_skips,
        "epoch": run.state.epoch + run.state.batch_in_epoch * int(run.t.batch_size) / max(1, run.train_pairs),
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
    Δ = (log πθ − log πref)(yw|x) − (log πθ − log πref)(yl|x) that β multiplies, and β-DPO's ``kept``."""
    margin = logratio_margin(values["policy_chosen_logps"], values["policy_rejected_logps"],
                             values["reference_chosen_logps"], values["reference_rejected_logps"])
    columns = {"margin": margin, **{name: values[k] for name, k in PAIR_COLUMNS.items() if k in values}}
    return [{"domain": d, **{name: round(float(v[i]), 6) for name, v in columns.items()}}
            for i, d in enumerate(domains)]


def batch_level_metrics(beta_head) -> dict[str, float]:
    """β-DPO's running statistics (``beta_dpo/M0``, ``beta_dpo/sigma``); nothing for the other modes."""
    if beta_head.batch_level is None:
        return {}
    return {"beta_dpo/M0": float(beta_head.batch_level.margin_mean), "beta_dpo/sigma":
            float(beta_head.batch_level.margin_std)}


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


def evaluate_and_log(run: Run, progress_write) -> None:
    run.last_eval = evaluate_pairs(run.model, run.eval_loader, run.accelerator)
    run.logger.log(run.state.step, run.last_eval)
    if run.accelerator.is_main_process:
        progress_write(format_eval(run.state.step, run.last_eval))


def save(run: Run, name: str) -> None:
    """Write ``checkpoints/<name>`` from the main process (all processes wait; under FSDP all gather the full
    state first), then prune old step-N."""
    run.accelerator.wait_for_everyone()
    full_state = gather_full_state(run.model, run.inner, run.optimizer) if is_sharded(run.accelerator) else None
    if run.accelerator.is_main_process:
        checkpoint_dir = run.run_dir / "checkpoints"
        save_checkpoint(checkpoint_dir / name, model=run.lm, config=run.cfg, optimizer=run.optimizer,
                        scheduler=run.scheduler, state=run.state, save_merged_lora=bool(run.t.lora.save_merged),
                        full_state=full_state)
        prune_checkpoints(checkpoint_dir, int(run.t.keep_last))
    run.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (e.g. SLURM pre-emption) asks the loop to stop at the next step boundary:
    the current step finishes (update, log, eval, save), ``checkpoints/step-N`` is written, then the run exits.
    A second signal aborts at once without saving (the last checkpoint stays valid: saves are atomic). So a
    checkpoint always holds a whole step, never a half-updated model, and resuming from it is exact.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self._previous = False, {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # second signal: abort without saving
        self.requested = True
        log.warning("%s: finishing this step, then saving a checkpoint and stopping (again to abort without saving)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop (all processes then stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train as configured; returns the final eval metrics. Writes ``run_dir/metrics.jsonl`` and checkpoints.
    The run holds its folder for its lifetime (:func:`lbdpo.train.run_dir.owned_run_dir`); Ctrl-C / SIGTERM stop
    it at a step boundary with a checkpoint (:class:`StopOnSignal`), then raise ``KeyboardInterrupt``."""
    with owned_run_dir(Path(run_dir), cfg.trainer.get("resume_from")):
        run = setup(cfg, Path(run_dir))
        with StopOnSignal() as stop:
            run_steps(run, stop)
        return finish(run)


def run_steps(run: Run, stop: StopOnSignal) -> None:
    """The loop: step, log, eval, save, until ``total_steps`` or a stop request (checkpoint, then raise)."""
    t, state = run.t, run.state
    run.model.train()
    progress = tqdm(total=run.total_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=not run.accelerator.is_main_process)
    while state.step < run.total_steps:
        t0 = time.perf_counter()
        result = optimizer_step(run)
        progress.update(1)
        if state.step % int(t.log_every) == 0 or state.step == run.total_steps:
            m = log_step(run, result, time.perf_counter() - t0)
            progress.set_postfix(loss=f"{m['loss']:.4f}", beta=f"{m.get('beta/mean', 0):.4f}",
                                 acc=f"{m.get('rewards/accuracies', 0):.2f}", pairs_s=f"{m['pairs_per_s']:.1f}")
        if run.eval_loader is not None and t.eval_every and state.step % int(t.eval_every) == 0:
            evaluate_and_log(run, progress.write)
        saved = bool(t.save_every) and state.step % int(t.save_every) == 0 and state.step < run.total_steps
        if saved:
            save(run, f"step-{state.step}")
        if stop.agreed(run.accelerator) and state.step < run.total_steps:
            if not saved:
                save(run, f"step-{state.step}")
            log.warning("stopped after step %d: resume with trainer.resume_from=auto", state.step)
            progress.close()
            run.logger.close()
            raise KeyboardInterrupt
    progress.close()


def finish(run: Run) -> dict[str, float]:
    """Final evaluation (unless the last step just ran one), ``checkpoints/final``, summary, shutdown."""
    t = run.t
    if run.eval_loader is not None and (not t.eval_every or run.state.step % int(t.eval_every) != 0):
        evaluate_and_log(run, print)
    save(run, "final")
    for problem in run.health.values():
        log.warning("!!! this run has a problem: %s", problem)
    run.logger.summary({**run.last_eval, **{f"health/{k}": v for k, v in run.health.items()}})
    run.logger.close()
    run.accelerator.end_training()
    return run.last_eval
