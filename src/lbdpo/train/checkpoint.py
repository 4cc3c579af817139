"""Atomic checkpoints and exact resume.

Layout of ``<run_dir>/checkpoints/step-N/`` (and ``final/``): an
:class:`~lbdpo.modeling.AutoModelForCausalLMWithBetaHead` folder (``from_pretrained`` loads policy + head;
``AutoModelForCausalLM.from_pretrained`` the policy alone; LoRA: the adapter, and ``merged/`` with
``trainer.lora.save_merged``), plus

    config.yaml           the run's resolved Hydra config
    trainer_state.pt      optimizer, scheduler, step/epoch/batch position, counters, RNG states

A checkpoint is written into a temporary sibling directory and renamed into place, so a kill during a
save leaves the previous checkpoint intact and never a half-written one under a real name. A save that fails (disk
full, no permission) removes its temporary folder and raises :class:`~lbdpo.errors.SaveError` naming the path and
the free space it needs. Loading checks each file is whole first (:mod:`lbdpo.integrity`): a damaged one is named in
a :class:`~lbdpo.errors.DamagedCheckpointError`, and ``resume_from=auto`` passes over a damaged ``step-N``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
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
from ..errors import LbdpoError, MissingFileError, RunStateError, SaveError
from ..integrity import check_intact, damaged_files, describe, read_checked

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")
# what torch.save's zip writer raises when the disk fills under it (a RuntimeError with no errno)
TORCH_WRITE_FAILURE = ("inline_container", "unexpected pos", "file write failed", "PytorchStreamWriter")
NO_SPACE = ("No space left on device", "StorageFull", "Disk quota exceeded")  # OS / safetensors (Rust) messages


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

    Raises:
        SaveError: the disk filled or another OS error stopped the write (the message names the path and the free
            space needed); the temporary folder is removed and the checkpoints already there are untouched.
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a checkpoint gets a normal folder's permissions
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
    except Exception as err:
        written = folder_bytes(tmp) if tmp is not None and tmp.exists() else 0
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # before measuring the free space: the partial write is freed
        failure = save_failure(err, path, max(written, checkpoint_bytes(path.parent, model, optimizer, full_state)))
        if failure is None:
            raise
        raise failure from err
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it is gone)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).is_dir() else 0


def checkpoint_bytes(checkpoint_dir: Path, model, optimizer, full_state: dict[str, Any] | None) -> int:
    """About how many bytes one checkpoint of this run takes: the largest complete one already in
    ``checkpoint_dir``, else the tensors it would hold (weights + optimizer state; bf16/fp32 as they are)."""
    sizes = [folder_bytes(p) for p in Path(checkpoint_dir).glob("*")
             if (STEP_DIR.match(p.name) or p.name == "final") and (p / "trainer_state.pt").is_file()]
    if sizes:
        return max(sizes)

    def tensors(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensors(v) for v in obj.values())
        return sum(tensors(v) for v in obj) if isinstance(obj, (list, tuple)) else 0

    try:
        if full_state:
            return tensors(full_state)
        return sum(tensors(p) for p in model.parameters()) + tensors(list(optimizer.state.values()))
    except Exception:  # an estimate only: a model without .parameters() (a test double) estimates nothing
        return 0


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def save_failure(err: BaseException, path: Path, needed: int) -> SaveError | None:
    """The one-line :class:`SaveError` for a failed write of checkpoint ``path`` (disk full: an ``ENOSPC`` /
    ``EDQUOT`` error, a "No space left" message, or torch's zip writer failing while the free space is below
    ``needed``; any other ``OSError``: its reason), or None for an error that is not a write failure (a bug: its
    traceback stays)."""
    text = str(err)
    torch_write = isinstance(err, RuntimeError) and any(m in text for m in TORCH_WRITE_FAILURE)
    os_error = isinstance(err, OSError) and not isinstance(err, LbdpoError)
    if not (os_error or torch_write or any(m in text for m in NO_SPACE)):
        return None
    where = path.parent if path.parent.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    previous = [p.name for _, p in list_step_checkpoints(path.parent)] + \
        (["final"] if (path.parent / "final" / "trainer_state.pt").is_file() else [])
    kept = f"the checkpoints already there ({', '.join(previous[-3:])}) are intact" if previous else \
        "no earlier checkpoint of this run exists"
    full = (os_error and getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)) or \
        any(m in text for m in NO_SPACE) or (torch_write and free < needed)
    if full:
        return SaveError(f"could not write checkpoint {path}: no space left on the device ({human(free)} free on "
                         f"{where}; a checkpoint of this run needs about {human(needed)}); free some space "
                         f"(trainer.keep_last=N keeps fewer step-N) or put the run on a larger disk, then resume with "
                         f"trainer.resume_from=auto; {kept}")
    reason = f"{err.strerror}: {err.filename}" if os_error and err.strerror else f"{type(err).__name__}: " + \
        (text.splitlines() or [""])[0][:200]
    return SaveError(f"could not write checkpoint {path} ({reason}); check that {where} is writable "
                     f"({human(free)} free, about {human(needed)} needed), then resume with trainer.resume_from=auto; "
                     f"{kept}")


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


RESUME_ELSEWHERE = ("resume from another checkpoint (trainer.resume_from=auto takes the newest intact step-N of the "
                    "run folder) or delete this one")


def newest_intact_checkpoint(checkpoint_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete ``step-N`` whose files are whole (:func:`lbdpo.integrity.damaged_files`), and a note for
    each newer one passed over (``step-6: <file> is damaged (…)``)."""
    skipped = []
    for _, path in reversed(list_step_checkpoints(checkpoint_dir)):
        problems = damaged_files(path)
        if not problems:
            return path, skipped
        skipped.append(f"{path.name}: {describe(problems)}")
    return None, skipped


def resolve_resume_path(resume_from: str | None, run_dir: Path) -> Path | None:
    """``trainer.resume_from``: None, ``auto`` (the newest intact step checkpoint in this run dir, if any; a damaged
    newer one is passed over, said in one log line) or a path (refused in one line when a file of it is damaged)."""
    if not resume_from:
        return None
    if resume_from == "auto":
        path, skipped = newest_intact_checkpoint(run_dir / "checkpoints")
        if skipped:
            log.warning("trainer.resume_from=auto: passing over damaged checkpoint(s) — %s — %s",
                        "; ".join(skipped),
                        f"resuming from {path.name}, the newest intact one" if path else "no intact one is left")
        return path
    path = Path(resume_from)
    if not (path / "trainer_state.pt").is_file():
        raise MissingFileError(f"trainer.resume_from={resume_from!r}: no trainer_state.pt in {path}")
    check_intact(path, RESUME_ELSEWHERE)
    return path


def load_trainer_state(path: Path, *, policy, beta_head, optimizer, scheduler, sharded=None) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; returns its TrainerState.
    ``sharded``: (the prepared model, its unwrapped DPO model) when FSDP shards them."""
    from safetensors.torch import load_file

    from ..modeling import HEAD_WEIGHTS

    blob = read_checked(path / "trainer_state.pt", lambda p: torch.load(p, map_location="cpu", weights_only=False),
                        RESUME_ELSEWHERE)
    if "optimizer" not in blob:
        raise LbdpoError(f"checkpoint {path}: its optimizer state was removed (the experiment runner keeps only the "
                         "final model of an evaluated run unless its file says keep: all); it can be evaluated or "
                         "exported, not resumed")
    head_state = read_checked(path / HEAD_WEIGHTS, load_file, RESUME_ELSEWHERE)
    if (path / "adapter_model.safetensors").is_file():
        if sharded is not None:
            raise RunStateError(f"checkpoint {path}: resuming a LoRA run under FSDP is not supported")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy, read_checked(path / "adapter_model.safetensors", load_file,
                                                       RESUME_ELSEWHERE))
    else:
        state_dict = {}
        for shard in sorted(path.glob("model*.safetensors")):
            state_dict.update(read_checked(shard, load_file, RESUME_ELSEWHERE))
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
