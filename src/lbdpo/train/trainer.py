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
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..dpo_model import PER_PAIR_KEYS
from ..metrics import metrics_by_domain, preference_metrics
from .checkpoint import prune_checkpoints, save_checkpoint
from .run_logging import format_eval
from .setup import Run, setup

log = logging.getLogger(__name__)


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` (0 when none has a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


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
    tokens: int  # real tokens this process saw
    grad_norm: float  # global norm of all gradients before clipping
    head_grad_norm: float  # the BetaHead's part of it


def optimizer_step(run: Run) -> StepResult:
    """Forward and backward over ``gradient_accumulation_steps`` micro-batches, then one update.

    NaN/inf guard: a non-finite loss or gradient norm on any process skips the update on all of them
    (counted in ``state.nonfinite_skips``); training stops after ``max_consecutive_nonfinite`` in a row.
    """
    t, accelerator, state = run.t, run.accelerator, run.state
    micro_batches = int(t.gradient_accumulation_steps)
    per_pair: dict[str, list[torch.Tensor]] = {k: [] for k in PER_PAIR_KEYS}
    tokens, nonfinite = 0, False
    for micro in range(micro_batches):
        batch = next(run.batches)
        sync = micro == micro_batches - 1
        with accelerator.no_sync(run.model) if not sync else contextlib.nullcontext():
            out = run.model(batch)
            if torch.isfinite(out.loss):
                accelerator.backward(out.loss / micro_batches)
            else:
                nonfinite = True
        for k, v in out.per_pair().items():
            per_pair[k].append(v)
        tokens += int(batch["attention_mask"].sum())

    params = [p for p in run.model.parameters() if p.requires_grad]
    head_norm = grad_norm(run.inner.beta_head.parameters())
    # one norm computation: clipping returns the pre-clip norm (max_norm = ∞ clips nothing)
    total_norm = accelerator.clip_grad_norm_(params, float(t.max_grad_norm) or float("inf"))
    if total_norm is None:  # DeepSpeed clips inside its engine and returns no norm
        total_norm = grad_norm(params)
    bad = torch.tensor(float(nonfinite or not torch.isfinite(total_norm)), device=accelerator.device)
    if accelerator.reduce(bad, reduction="sum").item() > 0:
        run.optimizer.zero_grad(set_to_none=True)
        if accelerator.scaler is not None:  # fp16: the unscaled-but-unused gradients must reset the scaler
            accelerator.scaler.update()
        state.nonfinite_skips += 1
        state.nonfinite_in_row += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                    state.step + 1, state.nonfinite_in_row)
        if state.nonfinite_in_row >= int(t.max_consecutive_nonfinite):
            raise RuntimeError(
                f"{state.nonfinite_in_row} consecutive non-finite steps (trainer.max_consecutive_nonfinite="
                f"{t.max_consecutive_nonfinite}); lower the learning rates or check the data")
    else:
        state.nonfinite_in_row = 0
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return StepResult(per_pair, tokens, float(total_norm), float(head_norm))


def log_step(run: Run, result: StepResult, elapsed: float) -> dict[str, float]:
    """Gather the step's per-pair values across processes and log its metrics (computed in one place)."""
    accelerator = run.accelerator
    values = {k: accelerator.gather(torch.cat(v)).cpu() for k, v in result.per_pair.items() if v}
    tokens = accelerator.reduce(torch.tensor(result.tokens, device=accelerator.device), "sum").item()
    metrics = preference_metrics(values) if "losses" in values and values["losses"].isfinite().all() \
        else {"loss": float("nan")}
    metrics.update({
        "beta_head/w": float(run.inner.beta_head.w.detach()),
        "grad_norm/total": result.grad_norm,
        "grad_norm/beta_head": result.head_grad_norm,
        "pairs_per_s": run.pairs_per_step / elapsed,
        "tokens_per_s": tokens / elapsed,
        "train/nonfinite_skips": run.state.nonfinite_skips,
        "epoch": run.state.epoch + run.state.batch_in_epoch * int(run.t.batch_size) / max(1, run.train_pairs),
    })
    for group in run.optimizer.param_groups:
        metrics[f"lr/{group['name']}"] = group["lr"]
    run.logger.log(run.state.step, metrics)
    if "beta" in values:
        run.logger.histogram(run.state.step, "beta/hist", values["beta"])
    return metrics


def evaluate_and_log(run: Run, progress_write) -> None:
    run.last_eval = evaluate_pairs(run.model, run.eval_loader, run.accelerator)
    run.logger.log(run.state.step, run.last_eval)
    if run.accelerator.is_main_process:
        progress_write(format_eval(run.state.step, run.last_eval))


def save(run: Run, name: str) -> None:
    """Write ``checkpoints/<name>`` from the main process (all processes wait), then prune old step-N."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        checkpoint_dir = run.run_dir / "checkpoints"
        save_checkpoint(checkpoint_dir / name, model=run.lm, config=run.cfg, optimizer=run.optimizer,
                        scheduler=run.scheduler, state=run.state, save_merged_lora=bool(run.t.lora.save_merged))
        prune_checkpoints(checkpoint_dir, int(run.t.keep_last))
    run.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train as configured; returns the final eval metrics. Writes ``run_dir/metrics.jsonl`` and checkpoints."""
    run = setup(cfg, Path(run_dir))
    t, state = run.t, run.state
    run.model.train()
    progress = tqdm(total=run.total_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=not run.accelerator.is_main_process)
    step_start = (state.epoch, state.batch_in_epoch)
    try:
        while state.step < run.total_steps:
            t0 = time.perf_counter()
            step_start = (state.epoch, state.batch_in_epoch)  # where an interrupted step would restart
            result = optimizer_step(run)
            progress.update(1)
            if state.step % int(t.log_every) == 0 or state.step == run.total_steps:
                m = log_step(run, result, time.perf_counter() - t0)
                progress.set_postfix(loss=f"{m['loss']:.4f}", beta=f"{m.get('beta/mean', 0):.4f}",
                                     acc=f"{m.get('rewards/accuracies', 0):.2f}", pairs_s=f"{m['pairs_per_s']:.1f}")
            if run.eval_loader is not None and t.eval_every and state.step % int(t.eval_every) == 0:
                evaluate_and_log(run, progress.write)
            if t.save_every and state.step % int(t.save_every) == 0 and state.step < run.total_steps:
                save(run, f"step-{state.step}")
    except KeyboardInterrupt:
        log.warning("interrupted: saving checkpoints/step-%d before exiting", state.step)
        state.epoch, state.batch_in_epoch = step_start  # the unfinished step is redone on resume
        run.optimizer.zero_grad(set_to_none=True)
        save(run, f"step-{state.step}")
        run.logger.close()
        raise
    progress.close()
    return finish(run)


def finish(run: Run) -> dict[str, float]:
    """Final evaluation (unless the last step just ran one), ``checkpoints/final``, summary, shutdown."""
    t = run.t
    if run.eval_loader is not None and (not t.eval_every or run.state.step % int(t.eval_every) != 0):
        evaluate_and_log(run, print)
    save(run, "final")
    run.logger.summary(run.last_eval)
    run.logger.close()
    run.accelerator.end_training()
    return run.last_eval
