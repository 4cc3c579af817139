"""A run's options checked before anything loads: each bad one fails with one line naming the key and what to do.

What can only be known after loading (the policy's hidden size, a file's rows) is checked where it is read.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..beta_head import BetaHeadConfig
from ..beta_modes import read_beta_schedule
from ..build import data_sources, resolve_path, to_container, tokenize_config
from ..data.label_noise import parse_label_noise
from ..models import _DTYPES
from ..scoring import FORWARDS, PACKED_ATTENTION
from .host_memory import MAX_MMAP_THRESHOLD
from ..errors import LbdpoError

log = logging.getLogger(__name__)

REFERENCE_MODES = ("auto", "copy", "precompute", "adapter_disabled")
SCHEDULES = ("linear", "cosine", "constant")
GROUPS = ("model", "beta_head", "data", "trainer", "logger")
LOGGER_BACKENDS = ("wandb", "tensorboard", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")
MODEL_SOURCES = ("hub", "smollm2_gguf", "tiny_random")


def number(key: str, value: Any, kind=float) -> float:
    """``value`` as ``kind`` (int or float), or a ValueError naming ``key``."""
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise LbdpoError(f"{key}={value!r} must be a{'n integer' if kind is int else ' number'}") from None
    if kind is int and isinstance(value, float) and value != out:
        raise LbdpoError(f"{key}={value!r} must be an integer")
    return out


def check_trainer_config(t: DictConfig) -> None:
    """Incompatible or invalid trainer options, naming the key."""
    if t.reference not in REFERENCE_MODES:
        raise LbdpoError(f"trainer.reference={t.reference!r} must be one of {REFERENCE_MODES}")
    if t.reference == "adapter_disabled" and not t.lora.enabled:
        raise LbdpoError("trainer.reference=adapter_disabled needs trainer.lora.enabled=true")
    if t.lr_schedule not in SCHEDULES:
        raise LbdpoError(f"trainer.lr_schedule={t.lr_schedule!r} must be one of {SCHEDULES}")
    if not t.max_steps and not t.num_epochs:
        raise LbdpoError("set trainer.max_steps or trainer.num_epochs")
    if t.max_steps is not None and number("trainer.max_steps", t.max_steps, int) < 0:
        raise LbdpoError(f"trainer.max_steps={t.max_steps} must be ≥ 1 (or null: trainer.num_epochs)")
    if not t.max_steps and number("trainer.num_epochs", t.num_epochs, int) < 1:
        raise LbdpoError(f"trainer.num_epochs={t.num_epochs} must be a whole number ≥ 1 (or set trainer.max_steps)")
    for key in ("batch_size", "gradient_accumulation_steps", "eval_batch_size", "log_every",
                "max_consecutive_nonfinite"):
        if number(f"trainer.{key}", t[key], int) < 1:
            raise LbdpoError(f"trainer.{key}={t[key]} must be ≥ 1")
    for key in ("eval_every", "save_every", "keep_last", "warmup_steps", "max_grad_norm", "weight_decay",
                "beta_head_weight_decay"):
        if not number(f"trainer.{key}", t[key]) >= 0:
            raise LbdpoError(f"trainer.{key}={t[key]} must be ≥ 0")
    for key in ("policy_lr", "beta_head_lr"):
        if not 0 <= number(f"trainer.{key}", t[key]) < math.inf:
            raise LbdpoError(f"trainer.{key}={t[key]} must be a finite number ≥ 0")
    if not 0 < number("trainer.adam_eps", t.adam_eps) < 1:
        raise LbdpoError(f"trainer.adam_eps={t.adam_eps} must be in (0, 1)")
    if not 0.0 <= number("trainer.label_smoothing", t.label_smoothing) < 0.5:
        raise LbdpoError(f"trainer.label_smoothing={t.label_smoothing} must be in [0, 0.5) (cDPO's label-noise rate)")
    if t.mixed_precision not in ("no", "bf16", "fp16"):
        raise LbdpoError(f"trainer.mixed_precision={t.mixed_precision!r} must be one of no, bf16, fp16")
    if t.get("cpu") and t.mixed_precision == "fp16":
        raise LbdpoError("trainer.mixed_precision=fp16 has no CPU implementation (trainer.cpu=true): use no or bf16")
    if t.get("logps_chunk_size") is not None and number("trainer.logps_chunk_size", t.logps_chunk_size, int) < 1:
        raise LbdpoError(f"trainer.logps_chunk_size={t.logps_chunk_size} must be ≥ 1 or null")
    if t.get("malloc_mmap_threshold") is not None and not \
            0 < number("trainer.malloc_mmap_threshold", t.malloc_mmap_threshold, int) <= MAX_MMAP_THRESHOLD:
        raise LbdpoError(f"trainer.malloc_mmap_threshold={t.malloc_mmap_threshold} must be in "
                         f"1..{MAX_MMAP_THRESHOLD} bytes (e.g. 131072) or null")
    if "pack_pairs" in t:
        raise LbdpoError(f"trainer.pack_pairs={t.pack_pairs} was replaced by trainer.forward: set trainer.forward="
                         f"{'packed' if t.pack_pairs else 'rows'} (or auto) and remove trainer.pack_pairs")
    if t.get("forward", "auto") not in ("auto", *FORWARDS):
        raise LbdpoError(f"trainer.forward={t.forward!r} must be auto, rows or packed")
    if t.get("packed_attention", "auto") not in ("auto", *PACKED_ATTENTION):
        raise LbdpoError(f"trainer.packed_attention={t.packed_attention!r} must be auto, segments, block_mask or flex")
    if t.get("packed_attention") == "segments" and t.get("compile"):
        raise LbdpoError("trainer.packed_attention=segments with trainer.compile=true: its per-segment loop would "
                         "recompile the decoder for every batch; set trainer.packed_attention=block_mask (or auto)")
    if t.get("compile") and t.get("cpu") and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise LbdpoError("trainer.compile=true on CPU needs a C++ compiler for torch.compile's inductor (g++ or "
                         "clang++): install one, or set trainer.compile=false")
    if t.lora.enabled:
        if number("trainer.lora.r", t.lora.r, int) < 1 or number("trainer.lora.alpha", t.lora.alpha) <= 0:
            raise LbdpoError(f"trainer.lora.r={t.lora.r} must be ≥ 1 and trainer.lora.alpha={t.lora.alpha} > 0")
        if not 0 <= number("trainer.lora.dropout", t.lora.dropout) < 1:
            raise LbdpoError(f"trainer.lora.dropout={t.lora.dropout} must be in [0, 1)")
    if t.max_steps and number("trainer.warmup_steps", t.warmup_steps) >= max(2, int(t.max_steps)):
        log.warning("trainer.warmup_steps=%s ≥ trainer.max_steps=%s: the learning rate never reaches its peak",
                    t.warmup_steps, t.max_steps)


def check_model_config(m: DictConfig) -> None:
    if m.source not in MODEL_SOURCES:
        raise LbdpoError(f"model.source={m.source!r} must be one of {MODEL_SOURCES}")
    for key in ("dtype", "reference_dtype"):
        value = m.get(key)
        if value is not None and value != "auto" and value not in _DTYPES:
            raise LbdpoError(f"model.{key}={value!r} must be one of {sorted(_DTYPES)} or auto")
    if m.get("padding_side", "right") not in ("left", "right"):
        raise LbdpoError(f"model.padding_side={m.padding_side!r} must be left or right")


def check_data_config(d: DictConfig) -> None:
    """Numbers, the tokenization options, and that every local data file exists (hub ids are checked on load)."""
    if "path" in d.keys() and OmegaConf.is_missing(d, "path"):
        raise LbdpoError("data=jsonl needs data.path=FILE (a .jsonl/.json/.csv/.parquet file or a folder of them)")
    for key in ("max_length", "max_prompt_length"):
        number(f"data.{key}", d[key], int)
    tokenize_config(d)  # its own checks (lengths, prompt_format), naming the keys
    for key in ("eval_size", "max_train_pairs", "max_eval_pairs"):
        if d.get(key) is not None and number(f"data.{key}", d[key], int) < 0:
            raise LbdpoError(f"data.{key}={d[key]} must be ≥ 0 (or null)")
    if d.get("eval_fraction") is not None and not 0 <= number("data.eval_fraction", d.eval_fraction) < 1:
        raise LbdpoError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1) (or null, with data.eval_size)")
    parse_label_noise(to_container(d.get("label_noise")))  # its domain is checked against the pairs on load
    for split in ("train", "eval"):
        for source in data_sources(d.get(split)):
            path = source.get("path") or ""
            if path and Path(path).is_absolute() and not Path(path).exists():
                from_env = " (its folder comes from LBDPO_SHARED_DATA or ../shared/data/preference)" \
                    if "preference" in path else ""
                raise LbdpoError(f"data.{split}: {path} does not exist{from_env}")


def check_beta_head(h: BetaHeadConfig) -> None:
    """What the head's own validation cannot see: ``schedule`` and ``schedule_from`` both set (a saved head config
    holds both, a run's config one), and the run ``schedule_from`` names (present, finished, with a β curve)."""
    if h.mode != "schedule":
        return
    if h.schedule is not None and h.schedule_from is not None:
        raise LbdpoError("beta_head.schedule and beta_head.schedule_from are both set: give one (the other null)")
    if h.schedule_from is not None:
        read_beta_schedule(resolve_path(h.schedule_from))


def check_logger_config(lg: DictConfig) -> None:
    backend = lg.get("backend", "none")
    if backend not in LOGGER_BACKENDS:
        raise LbdpoError(f"logger.backend={backend!r} must be one of {LOGGER_BACKENDS}")
    if backend == "wandb" and lg.get("mode", "auto") not in WANDB_MODES:
        raise LbdpoError(f"logger.mode={lg.mode!r} must be one of {WANDB_MODES}")
    if backend == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise LbdpoError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from None


def check_new_keys(overrides: list[str], cfg: DictConfig) -> None:
    """``+trainer.max_step=5`` adds a key no code reads (a typo): refuse it, listing the group's known keys."""
    for override in overrides:
        if not override.startswith("+") or override.startswith("++"):
            continue
        key = override[1:].split("=", 1)[0]
        group = key.split(".", 1)[0]
        if group in GROUPS and "." in key:
            known = sorted(k for k in cfg[group] if f"{group}.{k}" != key)
            raise LbdpoError(f"{key} is not an option of the {group} group (a typo?); its keys: {known}")


def check_resume_matches(checkpoint: Path, cfg: DictConfig) -> None:
    """A checkpoint resumes only into the same model, β head and LoRA shape: list what differs (before loading)."""
    saved = OmegaConf.load(checkpoint / "config.yaml") if (checkpoint / "config.yaml").is_file() else None
    if saved is None:
        return
    differ = []
    for section in ("model", "beta_head", "trainer.lora"):
        old, new = to_container(OmegaConf.select(saved, section)) or {}, to_container(OmegaConf.select(cfg, section))
        differ += [f"{section}.{k}: checkpoint {old.get(k)!r}, this run {v!r}" for k, v in new.items()
                   if k in old and old[k] != v]
    if differ:
        raise LbdpoError(f"trainer.resume_from={checkpoint}: the checkpoint was trained with other options ("
                         f"{'; '.join(differ[:4])}); resume with the same options or start a new run")


def check_config(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """All of the above, in the order a user reads the config."""
    if overrides:
        check_new_keys(overrides, cfg)
    number("seed", cfg.seed, int)
    check_model_config(cfg.model)
    check_beta_head(BetaHeadConfig.from_mapping({**to_container(cfg.beta_head), "hidden_size": 1}))
    check_data_config(cfg.data)
    check_trainer_config(cfg.trainer)
    check_logger_config(cfg.logger)
