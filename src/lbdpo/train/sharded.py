"""What changes when Accelerate shards the model (FSDP2): full tensors, full checkpoints, resume into shards.

Under FSDP2 every parameter is a ``DTensor`` holding this process's shard, so reading a value (w, a gradient
norm) needs the full tensor, and a checkpoint needs the full state dicts, gathered by *every* process and written
by the main one. The weights are in the same format as unsharded runs write (plain ``from_pretrained`` loads
them); the optimizer state is stored keyed by parameter name (``torch.distributed.checkpoint``'s full optimizer
state dict) instead of by index, so a run resumes under the same kind of launch it was saved under.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from ..errors import LbdpoError, RunStateError


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_launch(accelerator: Accelerator, beta_head_cfg) -> None:
    """One clear error, before any loading, where the launch is not what was asked for: Accelerate 1.15 runs FSDP
    and DeepSpeed only on accelerators, and on CPU it silently falls back to DDP (``trainer.cpu=true``) or to
    independent single processes that would each train alone into the same folder."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise RunStateError(f"{world} processes were launched but Accelerate runs each alone "
                           f"({accelerator.distributed_type}, device {accelerator.device}): on CPU set trainer.cpu=true "
                           "and launch DDP with `torchrun --nproc_per_node N train.py ...`")
    for kind, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        asked = os.environ.get(env, "false").lower() == "true"
        if asked and accelerator.distributed_type != DistributedType[kind]:
            raise RunStateError(f"the launch asks for {kind} ({env}=true) but Accelerate resolved it to "
                               f"{accelerator.distributed_type} on {accelerator.device}: Accelerate runs {kind} only on "
                               "GPUs/accelerators (and trainer.cpu=true forces CPU); on CPU use torchrun (DDP)")
    w_is_parameter = beta_head_cfg.w_trainable and beta_head_cfg.normalize != "batch_mean"
    if is_sharded(accelerator) and beta_head_cfg.mode == "learnable" and w_is_parameter and beta_head_cfg.w_init == "auto":
        raise LbdpoError("beta_head.w_init=auto is not supported under FSDP (w is set inside the sharded forward, "
                         "where the write would be lost): give a number, e.g. the beta_head/w a 1-process run logs "
                         "at step 1")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective: every process must call it), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _prefix_of(root: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise LbdpoError("module is not part of the model")


def gather_full_state(model, inner, optimizer) -> dict[str, Any]:
    """Full state dicts of the policy, the β head and the optimizer (collective; full on the main process,
    empty elsewhere), for :func:`lbdpo.train.checkpoint.save_checkpoint`."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    policy, head = _prefix_of(model, inner.policy_model), _prefix_of(model, inner.beta_head)
    return {
        "policy": {k[len(policy):]: v for k, v in state.items() if k.startswith(policy)},
        "beta_head": {k[len(head):]: v for k, v in state.items() if k.startswith(head)},
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
    }


def load_full_state(model, inner, optimizer, policy_state: dict[str, torch.Tensor],
                    head_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any], path: Path) -> None:
    """Load full (unsharded) state dicts, as every process read them from a checkpoint, into the sharded model."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    policy, head = _prefix_of(model, inner.policy_model), _prefix_of(model, inner.beta_head)
    state = {**{policy + k: v for k, v in policy_state.items()}, **{head + k: v for k, v in head_state.items()}}
    result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    expected = {k for k in get_model_keys(model) if k.startswith((policy, head))}
    missing = [k for k in result.missing_keys if k in expected and not k.endswith("lm_head.weight")]
    if missing:
        raise RunStateError(f"checkpoint {path} does not match the policy: missing={missing[:5]}")
    if not isinstance(next(iter(optimizer_state.get("state", {}) or {"": 0})), str):
        raise RunStateError(f"checkpoint {path}: its optimizer state is keyed by index (written by an unsharded "
                           "run); resume it without FSDP, or start a new run from its weights")
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def get_model_keys(model) -> list[str]:
    return [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
