"""The Learnable-β DPO training loop (hand-written, on 🤗 Accelerate). Reads top to bottom:

    set-up → data → models → reference → optimizer/scheduler → resume → loop(step: forward, backward,
    NaN guard, clip, update, log, eval, save) → final eval and checkpoint.

Entry point: :func:`train`, called by ``train.py`` with the composed Hydra config.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .build import build_beta_head, build_datasets, build_policy_and_reference, policy_hidden_size, to_container
from .checkpoint import (
    TrainerState,
    load_trainer_state,
    prune_checkpoints,
    resolve_resume_path,
    save_checkpoint,
)
from .data.collator import PreferenceCollator
from .dpo_model import DynamicBetaDPOModel
from .metrics import metrics_by_domain, preference_metrics
from .reference import add_reference_columns
from .run_logging import RunLogger

log = logging.getLogger(__name__)

REFERENCE_MODES = ("copy", "precompute", "adapter_disabled")
SCHEDULES = ("linear", "cosine", "constant")
PER_PAIR_KEYS = ("losses", "beta", "log_ppl", "f", "policy_chosen_logps", "policy_rejected_logps",
                 "chosen_rewards", "rejected_rewards")


def check_trainer_config(t: DictConfig) -> None:
    """Incompatible or invalid trainer options fail before anything is loaded, naming the key."""
    if t.reference not in REFERENCE_MODES:
        raise ValueError(f"trainer.reference={t.reference!r} must be one of {REFERENCE_MODES}")
    if t.reference == "adapter_disabled" and not t.lora.enabled:
        raise ValueError("trainer.reference=adapter_disabled needs trainer.lora.enabled=true")
    if t.lr_schedule not in SCHEDULES:
        raise ValueError(f"trainer.lr_schedule={t.lr_schedule!r} must be one of {SCHEDULES}")
    if not t.max_steps and not t.num_epochs:
        raise ValueError("set trainer.max_steps or trainer.num_epochs")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_batch_size"):
        if int(t[key]) < 1:
            raise ValueError(f"trainer.{key}={t[key]} must be ≥ 1")


def apply_lora(policy, lora_cfg: DictConfig):
    """Wrap the policy with a peft LoRA adapter (only the adapter trains)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    targets = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=int(lora_cfg.r), lora_alpha=int(lora_cfg.alpha), lora_dropout=float(lora_cfg.dropout),
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(policy, config)


def build_optimizer(model: DynamicBetaDPOModel, t: DictConfig) -> torch.optim.Optimizer:
    """AdamW with three groups: policy (policy_lr, weight_decay), beta-head NN (beta_head_lr,
    beta_head_weight_decay), and w (beta_head_lr, no weight decay)."""
    policy_params = [p for p in model.policy_model.parameters() if p.requires_grad]
    head_w = [p for n, p in model.beta_head.named_parameters() if n == "w"]
    head_nn = [p for n, p in model.beta_head.named_parameters() if n != "w"]
    groups = [
        {"name": "policy", "params": policy_params, "lr": float(t.policy_lr), "weight_decay": float(t.weight_decay)},
        {"name": "beta_head", "params": head_nn, "lr": float(t.beta_head_lr),
         "weight_decay": float(t.beta_head_weight_decay)},
        {"name": "beta_head_w", "params": head_w, "lr": float(t.beta_head_lr), "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, betas=(float(t.adam_beta1), float(t.adam_beta2)), eps=float(t.adam_eps))


def grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def epoch_order(train_ds, epoch: int, seed: int, batch_size: int, group_by_length: bool) -> list[int]:
    """The seeded order of training pairs for one epoch (same seed + epoch → same order, for exact resume)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if group_by_length:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(
            train_ds["prompt_input_ids"], train_ds["chosen_input_ids"], train_ds["rejected_input_ids"])]
        return list(get_length_grouped_indices(lengths, batch_size, generator=g))
    return torch.randperm(len(train_ds), generator=g).tolist()


def make_loader(ds, batch_size: int, collator, indices=None, drop_last=False) -> DataLoader:
    source = ds if indices is None else torch.utils.data.Subset(ds, indices)
    return DataLoader(source, batch_size=batch_size, shuffle=False, drop_last=drop_last, collate_fn=collator)


def tokenized_columns(ds):
    keep = {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "reference_chosen_logps",
            "reference_rejected_logps", "domain"}
    return ds.remove_columns([c for c in ds.column_names if c not in keep])


@torch.no_grad()
def evaluate_pairs(model, loader, accelerator: Accelerator) -> dict[str, float]:
    """Held-out preference metrics (``eval/…``), overall and per domain (``eval/<domain>/…``)."""
    model.eval()
    gathered: dict[str, list[torch.Tensor]] = {k: [] for k in PER_PAIR_KEYS}
    domains: list[str] = []
    for batch in loader:
        out = model(batch)
        values = out.per_pair()
        for k in PER_PAIR_KEYS:
            gathered[k].append(accelerator.gather_for_metrics(values[k]))
        if "domain" in batch:
            domains.extend(accelerator.gather_for_metrics(batch["domain"], use_gather_object=True))
    model.train()
    if not gathered["losses"]:
        return {}
    values = {k: torch.cat(v).cpu() for k, v in gathered.items()}
    metrics = {f"eval/{k}": v for k, v in preference_metrics(values).items()}
    if domains and len(set(domains)) > 1:
        for domain, sub in metrics_by_domain(values, domains).items():
            metrics.update({f"eval/{domain}/{k}": v for k, v in sub.items()})
    return metrics


def run_name_from_overrides(cfg: DictConfig) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
        return ",".join(o for o in overrides if not o.startswith(("hydra.", "trainer.resume_from"))) or "default"
    except ValueError:  # not under @hydra.main
        return "default"


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train as configured; returns the final eval metrics. Writes ``run_dir/metrics.jsonl`` and checkpoints."""
    t = cfg.trainer
    check_trainer_config(t)
    run_dir = Path(run_dir)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=bool(t.get("cpu", False)))
    set_seed(int(cfg.seed))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # ---- models -------------------------------------------------------------------------------
    need_ref_model = t.reference in ("copy", "precompute")
    policy, reference, tokenizer = build_policy_and_reference(cfg, need_reference=need_ref_model)
    if t.gradient_checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers ≥ 5 name
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    if t.lora.enabled:
        policy = apply_lora(policy, t.lora)
    beta_head = build_beta_head(cfg.beta_head, policy_hidden_size(policy))

    # ---- data ---------------------------------------------------------------------------------
    with accelerator.main_process_first():
        train_ds, eval_ds, data_report = build_datasets(cfg.data, tokenizer, seed=int(cfg.seed))
    collator = PreferenceCollator(tokenizer.pad_token_id, padding_side="right",
                                  pad_to_multiple_of=t.get("pad_to_multiple_of"))

    # ---- reference: a frozen copy, precomputed log-probs, or the policy with its adapter off ----
    if t.reference == "precompute":
        reference.to(accelerator.device)
        with accelerator.main_process_first():
            args = (to_container(cfg.model), collator, int(t.eval_batch_size), accelerator.device)
            train_ds = add_reference_columns(reference, train_ds, *args, name="train")
            if eval_ds is not None:
                eval_ds = add_reference_columns(reference, eval_ds, *args, name="eval")
        reference = None
        gc.collect()
    elif reference is not None:
        reference.to(accelerator.device)
    model = DynamicBetaDPOModel(policy, beta_head, ref_model=reference, label_smoothing=float(t.label_smoothing),
                                ref_from_disabled_adapter=t.reference == "adapter_disabled")
    train_ds, eval_ds = tokenized_columns(train_ds), (tokenized_columns(eval_ds) if eval_ds is not None else None)

    # ---- optimizer, schedule ------------------------------------------------------------------
    micro_batches = int(t.gradient_accumulation_steps)
    pairs_per_step = int(t.batch_size) * micro_batches * accelerator.num_processes
    steps_per_epoch = len(train_ds) // pairs_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_ds)} training pairs is fewer than one step's {pairs_per_step} "
                         "(trainer.batch_size × gradient_accumulation_steps × processes)")
    total_steps = int(t.max_steps) if t.max_steps else int(t.num_epochs) * steps_per_epoch
    optimizer = build_optimizer(model, t)
    warmup = int(t.warmup_steps) if t.warmup_steps >= 1 else int(float(t.warmup_steps) * total_steps)
    scheduler = get_scheduler(t.lr_schedule if t.lr_schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    # The scheduler is NOT passed to accelerator.prepare: Accelerate would step it once per process per
    # step, while our schedule is counted in optimizer steps of the global batch.
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    eval_loader = None
    if eval_ds is not None and len(eval_ds):
        eval_loader = accelerator.prepare_data_loader(make_loader(eval_ds, int(t.eval_batch_size), collator))

    # ---- resume -------------------------------------------------------------------------------
    state = TrainerState()
    resume_path = resolve_resume_path(t.resume_from, run_dir)
    if resume_path is not None:
        state = load_trainer_state(resume_path, policy=inner.policy_model, beta_head=inner.beta_head,
                                   optimizer=optimizer, scheduler=scheduler)
        log.info("resumed from %s at step %d", resume_path, state.step)

    logger = RunLogger(run_dir, cfg, cfg.logger, run_name=run_name_from_overrides(cfg), group=str(cfg.experiment),
                       enabled=accelerator.is_main_process,
                       resumed_step=state.step if resume_path is not None else None)
    if accelerator.is_main_process:
        print_banner(cfg, inner, data_report, total_steps, pairs_per_step, run_dir)
    checkpoint_dir = run_dir / "checkpoints"

    def checkpoint(name: str) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(checkpoint_dir / name, policy=inner.policy_model, tokenizer=tokenizer,
                            beta_head=inner.beta_head, config=cfg, optimizer=optimizer, scheduler=scheduler,
                            state=state, save_merged_lora=bool(t.lora.save_merged))
            prune_checkpoints(checkpoint_dir, int(t.keep_last))
        accelerator.wait_for_everyone()

    # ---- the loop -----------------------------------------------------------------------------
    model.train()
    policy_params = [p for p in inner.policy_model.parameters() if p.requires_grad]
    head_params = list(inner.beta_head.parameters())
    progress = tqdm(total=total_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process,
                    dynamic_ncols=True)
    batches = None
    last_eval: dict[str, float] = {}
    step_start = (state.epoch, state.batch_in_epoch)

    def next_batch() -> dict[str, Any]:
        """The next micro-batch; crosses epoch boundaries, and skips what a resumed run already consumed."""
        nonlocal batches
        while True:
            if batches is None:
                order = epoch_order(train_ds, state.epoch, int(cfg.seed), pairs_per_step, t.group_by_length)
                loader = accelerator.prepare_data_loader(
                    make_loader(train_ds, int(t.batch_size), collator, order, drop_last=True))
                if state.batch_in_epoch:
                    loader = accelerator.skip_first_batches(loader, state.batch_in_epoch)
                batches = iter(loader)
            try:
                batch = next(batches)
            except StopIteration:
                state.epoch, state.batch_in_epoch, batches = state.epoch + 1, 0, None
                continue
            state.batch_in_epoch += 1
            return batch

    try:
        while state.step < total_steps:
            t0 = time.perf_counter()
            step_start = (state.epoch, state.batch_in_epoch)  # where an interrupted step would restart
            per_pair: dict[str, list[torch.Tensor]] = {k: [] for k in PER_PAIR_KEYS}
            tokens = 0
            nonfinite = False
            for micro in range(micro_batches):
                batch = next_batch()
                sync = micro == micro_batches - 1
                with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                    out = model(batch)
                    if not torch.isfinite(out.loss):
                        nonfinite = True
                    else:
                        accelerator.backward(out.loss / micro_batches)
                for k, v in out.per_pair().items():
                    if k in per_pair:
                        per_pair[k].append(v)
                tokens += int(batch["attention_mask"].sum())

            # NaN/inf guard: agree across processes, skip the update, stop after too many in a row
            norms = {"policy": grad_norm(policy_params), "beta_head": grad_norm(head_params)}
            bad = torch.tensor(float(nonfinite or not all(torch.isfinite(n) for n in norms.values())),
                               device=accelerator.device)
            if accelerator.reduce(bad, reduction="sum").item() > 0:
                optimizer.zero_grad(set_to_none=True)
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
                if t.max_grad_norm:
                    accelerator.clip_grad_norm_(policy_params + head_params, float(t.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1
            progress.update(1)

            # ---- metrics: gathered across processes, computed in one place ----
            if state.step % int(t.log_every) == 0 or state.step == total_steps:
                values = {k: accelerator.gather(torch.cat(v)).cpu() for k, v in per_pair.items() if v}
                tokens_all = accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum").item()
                elapsed = time.perf_counter() - t0
                metrics = preference_metrics(values) if "losses" in values and values["losses"].isfinite().all() \
                    else {"loss": float("nan")}
                metrics.update({
                    "beta_head/w": float(inner.beta_head.w.detach()),
                    "grad_norm/policy": float(norms["policy"]),
                    "grad_norm/beta_head": float(norms["beta_head"]),
                    "pairs_per_s": pairs_per_step / elapsed,
                    "tokens_per_s": tokens_all / elapsed,
                    "train/nonfinite_skips": state.nonfinite_skips,
                    "epoch": state.epoch + state.batch_in_epoch * int(t.batch_size) / max(1, len(train_ds)),
                })
                for group in optimizer.param_groups:
                    metrics[f"lr/{group['name']}"] = group["lr"]
                logger.log(state.step, metrics)
                if "beta" in values:
                    logger.histogram(state.step, "beta/hist", values["beta"])
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", beta=f"{metrics.get('beta/mean', 0):.4f}",
                                     acc=f"{metrics.get('rewards/accuracies', 0):.2f}",
                                     pairs_s=f"{metrics['pairs_per_s']:.1f}")

            if eval_loader is not None and t.eval_every and state.step % int(t.eval_every) == 0:
                last_eval = evaluate_pairs(model, eval_loader, accelerator)
                logger.log(state.step, last_eval)
                if accelerator.is_main_process:
                    progress.write(format_eval(state.step, last_eval))
            if t.save_every and state.step % int(t.save_every) == 0 and state.step < total_steps:
                checkpoint(f"step-{state.step}")
    except KeyboardInterrupt:
        log.warning("interrupted: saving checkpoints/step-%d before exiting", state.step)
        state.epoch, state.batch_in_epoch = step_start  # the unfinished step is redone on resume
        optimizer.zero_grad(set_to_none=True)
        checkpoint(f"step-{state.step}")
        logger.close()
        raise
    progress.close()

    if eval_loader is not None and (not t.eval_every or state.step % int(t.eval_every) != 0):
        last_eval = evaluate_pairs(model, eval_loader, accelerator)
        logger.log(state.step, last_eval)
        if accelerator.is_main_process:
            print(format_eval(state.step, last_eval))
    checkpoint("final")
    logger.summary(last_eval)
    logger.close()
    accelerator.end_training()
    return last_eval


def format_eval(step: int, metrics: dict[str, float]) -> str:
    keys = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/beta/mean", "eval/log_ppl/mean")
    return f"[eval step {step}] " + "  ".join(f"{k[5:]}={metrics[k]:.4f}" for k in keys if k in metrics)


def count_params(module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def print_banner(cfg: DictConfig, model: DynamicBetaDPOModel, data_report: dict[str, Any], total_steps: int,
                 pairs_per_step: int, run_dir: Path) -> None:
    """Start-of-run summary: config essentials, parameter counts per group, data filter counts."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"lbdpo run → {run_dir}", show_header=False)
    m, h, t = cfg.model, cfg.beta_head, cfg.trainer
    table.add_row("model", f"{m.name_or_path} ({m.source}, {m.dtype})")
    if h.mode == "fixed":
        table.add_row("β", f"fixed β = {h.beta}")
    else:
        table.add_row("β", f"w·{h.ppl_transform}·f, NN={h.context_net_type}, ε={h.epsilon}, w_init={h.w_init}, "
                           f"w_trainable={h.w_trainable}, normalize={h.normalize}")
    table.add_row("data", f"{data_report['train_pairs']} train / {data_report['eval_pairs']} eval pairs")
    for split in ("train", "eval"):
        loader = data_report.get(f"{split}_loader") or {}
        skips = {**{k: v for k, v in loader.get("skipped", {}).items() if v}, **data_report[f"{split}_tokenizer_skips"]}
        if loader:
            table.add_row(f"skipped ({split})", ", ".join(f"{k}={v}" for k, v in skips.items()) or "none")
    for name, module in (("policy", model.policy_model), ("beta head", model.beta_head)):
        total, trainable = count_params(module)
        table.add_row(f"params: {name}", f"{trainable:,} trainable / {total:,}")
    table.add_row("schedule", f"{total_steps} steps × {pairs_per_step} pairs, policy_lr={t.policy_lr}, "
                              f"beta_head_lr={t.beta_head_lr}, reference={t.reference}")
    console.print(table)
    log.info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
