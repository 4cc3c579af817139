"""Atomic checkpoints and exact resume.

Layout of ``<run_dir>/checkpoints/step-N/`` (and ``final/``): an
:class:`~lbdpo.modeling.AutoModelForCausalLMWithBetaHead` folder (``from_pretrained`` loads policy + head;
``AutoModelForCausalLM.from_pretrained`` the policy alone; LoRA: the adapter, and ``merged/`` with
``trainer.lora.save_merged``), plus

    config.yaml           the run's resolved Hydra config
    trainer_state.pt      optimizer, scheduler, step/epoch/batch position, counters, RNG states

A checkpoint is written into a temporary sibling directory and renamed into place, so a kill during a
save leaves the previous checkpoint intact and never a half-written one under a real name.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from ..errors import LbdpoError, MissingFileError, RunStateError

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where training is: enough, with the RNG states, to continue exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current pass over the training data
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    nonfinite_skips: int = 0  # updates skipped because the loss or a gradient was NaN/inf
    nonfinite_in_row: int = 0  # consecutive skips (training stops past trainer.max_consecutive_nonfinite)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, model, config, optimizer, scheduler, state: TrainerState,
                    save_merged_lora: bool = False, full_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically to ``path`` (replacing an older one of the same name).

    Args:
        model: the run's :class:`~lbdpo.modeling.AutoModelForCausalLMWithBetaHead` (policy, head, tokenizer).
        full_state: under FSDP, the gathered ``policy`` / ``beta_head`` / ``optimizer`` state dicts to write
            (:func:`lbdpo.train.sharded.gather_full_state`) instead of the modules' and optimizer's own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a checkpoint gets a normal folder's permissions
    try:
        model.save_pretrained(tmp, merge_lora=save_merged_lora, provenance={"step": state.step},
                              state_dicts=(full_state["policy"], full_state["beta_head"]) if full_state else None)
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(config, resolve=True))
        torch.save(
            {
                "state": dataclasses.asdict(state),
                "optimizer": full_state["optimizer"] if full_state else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
            },
            tmp / "trainer_state.pt",
        )
        old = None
        if path.exists():
            old = path.with_name(f".old-{path.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def repair_checkpoint_dir(checkpoint_dir: Path) -> list[str]:
    """Undo what a kill during :func:`save_checkpoint` can leave: a ``.old-X`` whose replacement never landed is
    renamed back to ``X``; ``.tmp-*`` and other ``.old-*`` leftovers are deleted. Returns what it did."""
    done: list[str] = []
    if not checkpoint_dir.is_dir():
        return done
    for child in sorted(checkpoint_dir.iterdir()):
        if child.name.startswith(".old-"):
            target = child.with_name(child.name[len(".old-"):])
            if not target.exists():
                os.replace(child, target)
                done.append(f"restored {target.name} (a save of it was interrupted)")
            else:
                shutil.rmtree(child, ignore_errors=True)
                done.append(f"removed {child.name}")
        elif child.name.startswith(".tmp-"):
            shutil.rmtree(child, ignore_errors=True)
            done.append(f"removed {child.name} (left by an interrupted save)")
    return done


def list_step_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``step-N`` checkpoints under a directory, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for child in checkpoint_dir.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / "trainer_state.pt").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def prune_checkpoints(checkpoint_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for _, path in list_step_checkpoints(checkpoint_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume_path(resume_from: str | None, run_dir: Path) -> Path | None:
    """``trainer.resume_from``: None, ``auto`` (latest step checkpoint in this run dir, if any) or a path."""
    if not resume_from:
        return None
    if resume_from == "auto":
        found = list_step_checkpoints(run_dir / "checkpoints")
        return found[-1][1] if found else None
    path = Path(resume_from)
    if not (path / "trainer_state.pt").is_file():
        raise MissingFileError(f"trainer.resume_from={resume_from!r}: no trainer_state.pt in {path}")
    return path


def load_trainer_state(path: Path, *, policy, beta_head, optimizer, scheduler, sharded=None) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; returns its TrainerState.
    ``sharded``: (the prepared model, its unwrapped DPO model) when FSDP shards them."""
    from safetensors.torch import load_file

    from ..modeling import HEAD_WEIGHTS

    blob = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if "optimizer" not in blob:
        raise LbdpoError(f"checkpoint {path}: its optimizer state was removed (the experiment runner keeps only the "
                         "final model of an evaluated run unless its file says keep: all); it can be evaluated or "
                         "exported, not resumed")
    head_state = load_file(path / HEAD_WEIGHTS)
    if (path / "adapter_model.safetensors").is_file():
        if sharded is not None:
            raise RunStateError(f"checkpoint {path}: resuming a LoRA run under FSDP is not supported")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy, load_file(path / "adapter_model.safetensors"))
    else:
        state_dict = {}
        for shard in sorted(path.glob("model*.safetensors")):
            state_dict.update(load_file(shard))
        if not state_dict:
            raise RunStateError(f"checkpoint {path} holds no model*.safetensors")
        if sharded is not None:
            from .sharded import load_full_state

            load_full_state(*sharded, optimizer, state_dict, head_state, blob["optimizer"], path)
        else:
            missing, unexpected = policy.load_state_dict(state_dict, strict=False)
            missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings are not saved
            if missing or unexpected:
                raise RunStateError(f"checkpoint {path} does not match the policy: missing={missing[:5]} "
                                   f"unexpected={unexpected[:5]}")
    if sharded is None:
        beta_head.load_state_dict(head_state)
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return TrainerState(**blob["state"])
