"""The Learnable-β DPO training loop (hand-written, on 🤗 Accelerate), in phases that each fit one screen:

    setup        models, data, reference, optimizer/schedule, resume, logger  →  a Run  (:mod:`.setup`)
    loop         optimizer_step (forward, backward, NaN guard, clip, update) → log_step → eval / save
    finish       final eval, checkpoints/final, summary

Entry point: :func:`train`, called by ``train.py`` with the composed Hydra config.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..dpo_model import PER_PAIR_KEYS
from ..errors import RunStateError
from ..logprobs import DeferredChecks
from ..metrics import metrics_by_domain, preference_metrics
from .checkpoint import prune_checkpoints, save_checkpoint
from .run_dir import owned_run_dir
from .run_logging import format_eval
from .setup import Run, setup
from .signals import RaiseOnSignal, StopOnSignal, training_stopped
from .step_metrics import StepResult, check_health, health_problems, log_step, pair_rows, read_step  # noqa: F401
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


def optimizer_step(run: Run) -> StepResult:
    """Forward and backward over ``gradient_accumulation_steps`` micro-batches, then one update.

    NaN/inf guard: a non-finite loss or gradient norm on any process skips the update on all of them
    (counted in ``state.nonfinite_skips`` on each); training stops after ``max_consecutive_nonfinite`` in a row.
    Every process runs the same collectives whatever its loss: a non-finite loss is still backpropagated (its
    non-finite gradients, all-reduced by DDP or reduce-scattered by FSDP, reach every process; they are discarded),
    and the skip is decided from a flag gathered across processes, so all processes decide alike.

    The host reads the device once a step (:func:`lbdpo.train.step_metrics.read_step`: the flag, the norms and the
    step's metrics together); the batch checks of the forwards are deferred to that read.
    """
    t, accelerator, state = run.t, run.accelerator, run.state
    device = accelerator.device
    micro_batches = int(t.gradient_accumulation_steps)
    per_pair: dict[str, list[torch.Tensor]] = {k: [] for k in PER_PAIR_KEYS}
    domains: list[str | None] = []
    loss_finite = torch.ones((), dtype=torch.bool, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)  # real tokens, counted on the device
    checks = DeferredChecks()  # the batch checks' reads join the step's one read (step_metrics.read_step)
    run.inner.beta_head.set_step(state.step + 1)  # beta_head=schedule: β(t) of this step (1-based, as logged)
    for micro in range(micro_batches):
        batch = next(run.batches)
        sync = micro == micro_batches - 1
        with accelerator.no_sync(run.model) if not sync else contextlib.nullcontext(), checks:
            out = run.model(batch)
            # always backward (never branch on this process's loss): DDP's all-reduce and FSDP's reduce-scatter
            # are collectives that every process must enter
            accelerator.backward(out.loss / micro_batches)
        loss_finite &= torch.isfinite(out.loss.detach()).to(device)
        for k, v in out.per_pair().items():
            per_pair[k].append(v)
        domains += batch.get("domain") or [None] * len(out.losses)
        tokens = tokens + batch["attention_mask"].sum()  # on the device: read with the rest
        if run.beta_val is not None:  # beta_head.objective=validation: what the head's hypergradient needs
            run.beta_val.record(batch, out)

    params = [p for p in run.model.parameters() if p.requires_grad]
    head_ids = {id(p) for p in run.inner.beta_head.parameters()}
    policy_params = [p for p in params if id(p) not in head_ids]
    head_params = [p for p in params if id(p) in head_ids]
    max_norm = float(t.max_grad_norm)
    accelerator.unscale_gradients()  # fp16: the true gradients before any norm (a no-op otherwise)
    extra = run.beta_val.apply(run) if run.beta_val is not None else {}  # the head's hypergradient replaces its own
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
    # one collective and one device read: the decision, the norms and the step's metrics
    result = read_step(accelerator, run.inner.beta_head, bad, torch.cat([group_norms, total_norm.reshape(1)]), tokens,
                       per_pair, checks, domains)
    result.extra.update(extra)
    if result.skip:
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
    return result


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


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train as configured; returns the final eval metrics. Writes ``run_dir/metrics.jsonl`` and checkpoints.
    The run holds its folder for its lifetime (:func:`lbdpo.train.run_dir.owned_run_dir`). Ctrl-C / SIGTERM in the
    loop stop it at a step boundary with a checkpoint (:class:`StopOnSignal`); in the set-up (the reference
    precompute) or the final evaluation and save, at once (:class:`RaiseOnSignal`). Either way it raises
    :class:`~lbdpo.errors.Interrupted` (a ``KeyboardInterrupt``) whose one line says what the folder keeps."""
    run_dir, run, phase = Path(run_dir), None, "set-up"
    with owned_run_dir(run_dir, cfg.trainer.get("resume_from")):
        try:
            with RaiseOnSignal():
                run = setup(cfg, run_dir)
            phase = "training"
            with StopOnSignal() as stop:
                run_steps(run, stop)
            phase = "the final evaluation and save"
            with RaiseOnSignal():
                return finish(run)
        except KeyboardInterrupt as err:
            if run is not None and phase != "training":
                with contextlib.suppress(Exception):
                    run.logger.close()
            raise training_stopped(err, run_dir, phase, run.state.step if run else None) from None


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
