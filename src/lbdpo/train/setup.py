"""Set-up of a training run: the trainer options' checks, models + data + reference, the optimizer, the
micro-batch stream, resume and the logger, gathered into a :class:`Run` that the loop's phases share."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import get_scheduler

from ..build import (
    build_beta_head,
    build_datasets,
    build_policy_and_reference,
    policy_hidden_size,
    to_container,
    tokenize_config,
)
from ..beta_domains import bind_domains
from ..data.collator import PreferenceCollator
from ..data.loading import hold_out_pairs
from ..dpo_model import DynamicBetaDPOModel
from ..modeling import AutoModelForCausalLMWithBetaHead
from .beta_validation import BetaValidation, beta_val_fraction, build_beta_validation
from .beta_validation import check_launch as check_beta_validation
from .checkpoint import TrainerState, load_trainer_state, resolve_resume_path
from .checks import check_config, check_resume_matches
from .host_memory import pin_mmap_threshold
from .reference import add_reference_columns, resolve_reference_mode
from .run_logging import RunLogger, WandbIdentity, print_banner
from .sharded import check_launch, is_sharded
from ..errors import LbdpoError

log = logging.getLogger(__name__)

DATA_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "reference_chosen_logps",
                "reference_rejected_logps", "domain")

def apply_lora(policy, lora_cfg: DictConfig):
    """Wrap the policy with a peft LoRA adapter (only the adapter trains)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    targets = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=int(lora_cfg.r), lora_alpha=int(lora_cfg.alpha), lora_dropout=float(lora_cfg.dropout),
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(policy, config)


def compile_decoder(model) -> None:
    """``trainer.compile``: the decoder (embeddings, layers, final norm) compiled in place by ``torch.compile``
    (inductor; dynamic shapes, since packed rows change length every step). lm_head and the chunked log-probs stay
    eager; parameter names and checkpoints are unchanged. The first steps pay the compilation."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    base.get_decoder().compile(dynamic=True)


def build_optimizer(model: DynamicBetaDPOModel, t: DictConfig) -> torch.optim.Optimizer:
    """AdamW with three groups: policy (policy_lr, weight_decay), beta-head NN (beta_head_lr,
    beta_head_weight_decay), and w or log w (beta_head_lr, no weight decay). ``trainer.adamw_fused``: torch's fused kernel
    (one pass per tensor, no parameter-sized temporaries; the same update up to float rounding)."""
    policy_params = [p for p in model.policy_model.parameters() if p.requires_grad]
    no_decay = ("w", "log_w", "domain_table.log_beta")  # w, log w, per_domain_learned's log β per domain
    head_w = [p for n, p in model.beta_head.named_parameters() if n in no_decay]
    head_nn = [p for n, p in model.beta_head.named_parameters() if n not in no_decay]
    groups = [
        {"name": "policy", "params": policy_params, "lr": float(t.policy_lr), "weight_decay": float(t.weight_decay)},
        {"name": "beta_head", "params": head_nn, "lr": float(t.beta_head_lr),
         "weight_decay": float(t.beta_head_weight_decay)},
        {"name": "beta_head_w", "params": head_w, "lr": float(t.beta_head_lr), "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, betas=(float(t.adam_beta1), float(t.adam_beta2)), eps=float(t.adam_eps),
                             fused=True if t.get("adamw_fused") else None)


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


class TrainBatches:
    """Micro-batches of the training pairs, epoch after epoch in the seeded order of :func:`epoch_order`.

    Reads and advances ``state.epoch`` / ``state.batch_in_epoch``, so a run resumed from a checkpoint
    continues with exactly the batch it would have seen next.
    """

    def __init__(self, train_ds, collator, accelerator: Accelerator, t: DictConfig, seed: int, state: TrainerState,
                 pairs_per_step: int):
        self.ds, self.collator, self.accelerator, self.t = train_ds, collator, accelerator, t
        self.seed, self.state, self.pairs_per_step = seed, state, pairs_per_step
        self._it = None

    def __next__(self) -> dict[str, Any]:
        state = self.state
        while True:
            if self._it is None:
                order = epoch_order(self.ds, state.epoch, self.seed, self.pairs_per_step, self.t.group_by_length)
                loader = self.accelerator.prepare_data_loader(
                    make_loader(self.ds, int(self.t.batch_size), self.collator, order, drop_last=True))
                if state.batch_in_epoch:
                    loader = self.accelerator.skip_first_batches(loader, state.batch_in_epoch)
                self._it = iter(loader)
            try:
                batch = next(self._it)
            except StopIteration:
                state.epoch, state.batch_in_epoch, self._it = state.epoch + 1, 0, None
                continue
            state.batch_in_epoch += 1
            return batch


def hydra_overrides() -> tuple[list[str], str | None]:
    """The command line's task overrides (``hydra.*`` and ``trainer.resume_from`` left out) and, in a multirun,
    the sweep folder; ``([], None)`` outside ``@hydra.main``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under @hydra.main
        return [], None
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith(("hydra.", "trainer.resume_from"))]
    return overrides, str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


@dataclass
class Run:
    """What the phases of one training run share; built by :func:`setup`."""

    cfg: DictConfig
    run_dir: Path
    accelerator: Accelerator
    model: Any  # the DynamicBetaDPOModel as prepared by Accelerate (DDP-wrapped under several processes)
    lm: AutoModelForCausalLMWithBetaHead  # its policy + head + tokenizer: what checkpoints save
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: TrainBatches
    eval_loader: DataLoader | None
    logger: RunLogger
    state: TrainerState
    total_steps: int
    pairs_per_step: int
    train_pairs: int
    last_eval: dict[str, float] = field(default_factory=dict)
    health: dict[str, str] = field(default_factory=dict)  # problem kind → first warning (see trainer.health_problems)
    first_log_ppl: float | None = None  # the first logged step's prompt log PPL (collapse is a rise from it)
    beta_val: BetaValidation | None = None  # beta_head.objective=validation: the head's hypergradient (else None)

    @property
    def t(self) -> DictConfig:
        return self.cfg.trainer

    @property
    def inner(self) -> DynamicBetaDPOModel:
        return self.accelerator.unwrap_model(self.model)


def build_model_and_data(cfg: DictConfig, accelerator: Accelerator):
    """Policy (+ LoRA, activation checkpointing) and BetaHead as one AutoModelForCausalLMWithBetaHead (what
    checkpoints save), tokenized data, and the reference, wired into a :class:`DynamicBetaDPOModel`.
    Returns (dpo model, the policy+head object, train_ds, eval_ds or None, data_report, collator, beta_val_ds: the
    held-out slice of ``data.beta_val_fraction``, possibly empty)."""
    t = cfg.trainer
    need_reference = t.reference in ("auto", "copy", "precompute")
    policy, reference, tokenizer = build_policy_and_reference(cfg, need_reference=need_reference)
    if t.gradient_checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers ≥ 5 name
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    if t.lora.enabled:
        policy = apply_lora(policy, t.lora)
    if t.get("compile"):
        for model in (policy, reference):
            if model is not None:
                compile_decoder(model)
    beta_head = build_beta_head(cfg.beta_head, policy_hidden_size(policy))
    lm = AutoModelForCausalLMWithBetaHead(policy, beta_head, tokenizer, tokenize=tokenize_config(cfg.data),
                                          base_model=to_container(cfg.model))

    with accelerator.main_process_first():
        train_ds, eval_ds, data_report = build_datasets(cfg.data, tokenizer, seed=int(cfg.seed))
    # per_domain(_learned): a domain of the map that no pair has is a typo, not a default; the learned table's domains
    bind_domains(beta_head, set(train_ds["domain"]) if "domain" in train_ds.column_names else set())
    # data.beta_val_fraction: a seeded slice of the training pairs, never trained on (objective=validation's loss)
    train_ds, beta_val_ds = hold_out_pairs(train_ds, beta_val_fraction(cfg), seed=int(cfg.seed))
    data_report["beta_val_pairs"] = len(beta_val_ds)
    collator = PreferenceCollator(tokenizer.pad_token_id, padding_side="right",
                                  pad_to_multiple_of=t.get("pad_to_multiple_of"))

    # the reference: a frozen copy, precomputed log-probs (scored the way the copy would be, then freed), or
    # the adapter-off policy; auto = precompute when the run reads the whole split, else copy
    mode = resolve_reference_mode(t, len(train_ds), accelerator.num_processes)
    if reference is not None:
        reference.to(accelerator.device)
    model = DynamicBetaDPOModel(lm, ref_model=reference, label_smoothing=float(t.label_smoothing),
                                ref_from_disabled_adapter=t.reference == "adapter_disabled",
                                forward=t.get("forward", "auto"), packed_attention=t.get("packed_attention", "auto"),
                                logps_chunk_size=t.get("logps_chunk_size"), pad_to_multiple_of=t.get("pad_to_multiple_of"),
                                device=accelerator.device, compiled=bool(t.get("compile")))
    model.reference_mode = mode  # what the banner reports
    if mode == "precompute":
        with accelerator.main_process_first():
            args = (to_container(cfg.model), collator, int(t.eval_batch_size), accelerator.device)
            train_ds = add_reference_columns(model.reference_logps, train_ds, *args, name="train")
            if eval_ds is not None:
                eval_ds = add_reference_columns(model.reference_logps, eval_ds, *args, name="eval")
            if len(beta_val_ds):
                beta_val_ds = add_reference_columns(model.reference_logps, beta_val_ds, *args, name="beta_val")
        model.drop_reference()
        del reference
        gc.collect()
    train_ds = train_ds.remove_columns([c for c in train_ds.column_names if c not in DATA_COLUMNS])
    if eval_ds is not None:
        eval_ds = eval_ds.remove_columns([c for c in eval_ds.column_names if c not in DATA_COLUMNS])
    beta_val_ds = beta_val_ds.remove_columns([c for c in beta_val_ds.column_names if c not in DATA_COLUMNS])
    return model, lm, train_ds, eval_ds, data_report, collator, beta_val_ds


def describe_processes(accelerator: Accelerator, inner) -> str:
    """E.g. ``2 processes, FSDP (parameters sharded: DTensor)``: what the banner says about the launch."""
    kind = str(accelerator.distributed_type).split(".")[-1]
    weight = next(inner.policy_model.parameters())
    sharded = f", parameters {type(weight).__name__}" if kind == "FSDP" else ""
    return f"{accelerator.num_processes} process(es), {kind}{sharded}, device {accelerator.device}"


def setup(cfg: DictConfig, run_dir: Path) -> Run:
    """Everything before the first step: models and data, optimizer and schedule, resume, logger, banner."""
    t = cfg.trainer
    check_config(cfg, hydra_overrides()[0])  # every option's errors before any loading
    resume_path = resolve_resume_path(t.resume_from, run_dir)  # a bad path fails here, before any loading
    if resume_path is not None:
        check_resume_matches(resume_path, cfg)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=bool(t.get("cpu", False)))
    check_launch(accelerator, cfg.beta_head)
    set_seed(int(cfg.seed))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if t.get("malloc_mmap_threshold"):
        pin_mmap_threshold(int(t.malloc_mmap_threshold))  # before any model is loaded
    check_beta_validation(cfg, accelerator)  # objective=validation's launch and data.beta_val_fraction
    model, lm, train_ds, eval_ds, data_report, collator, beta_val_ds = build_model_and_data(cfg, accelerator)

    pairs_per_step = int(t.batch_size) * int(t.gradient_accumulation_steps) * accelerator.num_processes
    steps_per_epoch = len(train_ds) // pairs_per_step
    if steps_per_epoch == 0:
        raise LbdpoError(f"{len(train_ds)} training pairs is fewer than one step's {pairs_per_step} "
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

    state = TrainerState()
    if resume_path is not None:
        state = load_trainer_state(resume_path, policy=inner.policy_model, beta_head=inner.beta_head,
                                   optimizer=optimizer, scheduler=scheduler,
                                   sharded=(model, inner) if is_sharded(accelerator) else None)
        log.info("resumed from %s at step %d", resume_path, state.step)
    overrides, sweep_dir = hydra_overrides()
    logger = RunLogger(run_dir, cfg, cfg.logger, identity=WandbIdentity.of(overrides, str(cfg.experiment), sweep_dir),
                       enabled=accelerator.is_main_process,
                       resumed_step=state.step if resume_path is not None else None,
                       log_pairs=bool(cfg.trainer.get("log_pairs", False)))
    if accelerator.is_main_process:
        print_banner(cfg, inner, data_report, total_steps, pairs_per_step, run_dir,
                     describe_processes(accelerator, inner))
    batches = TrainBatches(train_ds, collator, accelerator, t, int(cfg.seed), state, pairs_per_step)
    return Run(cfg=cfg, run_dir=run_dir, accelerator=accelerator, model=model, lm=lm,
               optimizer=optimizer, scheduler=scheduler, batches=batches, eval_loader=eval_loader, logger=logger,
               state=state, total_steps=total_steps, pairs_per_step=pairs_per_step, train_pairs=len(train_ds),
               beta_val=build_beta_validation(cfg, accelerator, inner, beta_val_ds, collator))
