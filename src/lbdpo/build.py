"""Assemble the pieces of a run from a Hydra config: models, BetaHead, datasets. Shared by train and evaluate."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from .beta_head import BetaHead, BetaHeadConfig
from .models import freeze, hidden_size_of, load_model, load_model_and_tokenizer, reference_model_config
from .errors import LbdpoError
from .paths import find_project

log = logging.getLogger(__name__)


def to_container(cfg: Any) -> Any:
    """Plain dict/list from an OmegaConf node (resolved); other values unchanged."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def resolve_path(path: str | Path) -> Path:
    """A config path: absolute as is; relative to the current directory if it exists there, else to the project
    folder (the checkout: :func:`lbdpo.paths.find_project`) when there is one, else as given."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    home = find_project()
    return home / p if home is not None else p


def build_beta_head(beta_head_cfg: Mapping[str, Any], hidden_size: int) -> BetaHead:
    """BetaHead from the ``beta_head`` group; ``hidden_size: null`` takes the policy's."""
    data = dict(to_container(beta_head_cfg))
    if data.get("schedule_from"):  # a run folder relative to the checkout, like data paths; saved absolute
        data["schedule_from"] = str(resolve_path(data["schedule_from"]))
    if data.get("hidden_size") in (None, "auto"):
        data["hidden_size"] = hidden_size
    elif int(data["hidden_size"]) != hidden_size:
        raise LbdpoError(f"beta_head.hidden_size={data['hidden_size']} but the policy's hidden size is {hidden_size}")
    return BetaHead(BetaHeadConfig.from_mapping(data))


def build_policy_and_reference(cfg: DictConfig, need_reference: bool):
    """(policy, reference or None, tokenizer). The reference is a separately loaded, frozen copy, in
    ``model.reference_dtype`` when that is set (see :func:`lbdpo.models.reference_model_config`)."""
    model_cfg = to_container(cfg.model)
    policy, tokenizer = load_model_and_tokenizer(model_cfg)
    reference = freeze(load_model(reference_model_config(model_cfg), vocab_size=len(tokenizer))) \
        if need_reference else None
    return policy, reference, tokenizer


def policy_hidden_size(policy) -> int:
    return hidden_size_of(getattr(policy, "base_model", policy) if hasattr(policy, "peft_config") else policy)


def data_sources(value: Any) -> list[dict[str, Any]]:
    """A data source list from config: one path string, one dict, or a list of either."""
    if value is None:
        return []
    value = to_container(value)
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        item = {"path": item} if isinstance(item, str) else dict(item)
        path = item.get("path")
        if path and not _is_hub_id(path):
            item["path"] = str(resolve_path(path))
        out.append(item)
    return out


def _is_hub_id(path: str) -> bool:
    return not Path(path).suffix and path.count("/") == 1 and not resolve_path(path).exists()


def tokenize_config(data_cfg: DictConfig):
    """The ``data`` group's tokenization keys as a :class:`~lbdpo.data.tokenize.TokenizeConfig`."""
    from .data.tokenize import TokenizeConfig

    return TokenizeConfig(prompt_format=data_cfg.get("prompt_format", "auto"), max_length=int(data_cfg.max_length),
                          max_prompt_length=int(data_cfg.max_prompt_length), num_proc=data_cfg.get("num_proc"))


def build_datasets(data_cfg: DictConfig, tokenizer, seed: int, tokenize_train: bool = True):
    """Load, filter, split and tokenize the train and eval pairs described by the ``data`` group.

    Args:
        tokenize_train: False for evaluation: the train rows are still read when the eval split is cut from
            them (``eval_fraction`` / ``eval_size``), but not tokenized, and the train dataset is None.

    Returns:
        (train dataset or None, eval dataset or None, report dict with the loader's filter counts and the
        tokenizer's skip counts, for the start banner and the run's summary).
    """
    from .data.label_noise import apply_label_noise
    from .data.loading import load_mixture, train_eval_split
    from .data.tokenize import tokenize_pairs, truncation_warning

    eval_sources = data_sources(data_cfg.get("eval"))
    if eval_sources and not tokenize_train:  # evaluation with its own eval files: the train files are not read
        train_raw, train_report = None, None
    else:
        train_raw, train_report = load_mixture(data_sources(data_cfg.train), seed=seed)
    eval_report = None
    if eval_sources:
        eval_raw, eval_report = load_mixture(eval_sources, seed=seed)
    elif data_cfg.get("eval_fraction") or data_cfg.get("eval_size"):
        if data_cfg.get("eval_fraction") and data_cfg.get("eval_size"):
            raise LbdpoError("set only one of data.eval_fraction and data.eval_size (the other to null)")
        train_raw, eval_raw = train_eval_split(
            train_raw, eval_fraction=data_cfg.get("eval_fraction"), eval_size=data_cfg.get("eval_size"), seed=seed
        )
    else:
        eval_raw = None
    if train_raw is not None and data_cfg.get("max_train_pairs"):
        train_raw = train_raw.select(range(min(len(train_raw), int(data_cfg.max_train_pairs))))
    if eval_raw is not None and data_cfg.get("max_eval_pairs"):
        eval_raw = eval_raw.select(range(min(len(eval_raw), int(data_cfg.max_eval_pairs))))

    tok_cfg = tokenize_config(data_cfg)
    train_ds, train_skips, label_noise = None, Counter(), None
    cut = {"train": Counter(), "eval": Counter()}  # what truncation cut in the kept pairs (tokenize.TRUNCATION_REASONS)
    if tokenize_train:
        train_ds, train_skips = tokenize_pairs(train_raw, tokenizer, tok_cfg, desc="tokenize train",
                                               truncated=cut["train"])
        if len(train_ds) == 0:
            raise LbdpoError(f"no training pairs left after tokenization: {len(train_raw)} pairs skipped "
                             f"({', '.join(f'{k}={v}' for k, v in train_skips.items())}); raise data.max_length / "
                             "data.max_prompt_length")
        # data.label_noise: chosen/rejected swapped in a seeded fraction of one domain's training pairs (never eval's)
        train_ds, label_noise = apply_label_noise(train_ds, to_container(data_cfg.get("label_noise")), seed)
    eval_ds, eval_skips = (None, Counter())
    if eval_raw is not None:
        eval_ds, eval_skips = tokenize_pairs(eval_raw, tokenizer, tok_cfg, desc="tokenize eval", truncated=cut["eval"])
    report = {
        "train_loader": train_report.as_dict() if train_report else None,
        "train_tokenizer_skips": dict(train_skips),
        "eval_loader": eval_report.as_dict() if eval_report else None,
        "eval_tokenizer_skips": dict(eval_skips),
        "train_pairs": len(train_ds) if train_ds is not None else None,
        "eval_pairs": len(eval_ds) if eval_ds is not None else 0,
        "label_noise": label_noise,  # {domain, fraction, domain_pairs, flipped}, or None
        "train_truncated": dict(cut["train"]), "eval_truncated": dict(cut["eval"]),  # {reason: pairs, pairs_cut}
    }
    warnings = [truncation_warning(cut[split], len(ds), split, tok_cfg)
                for split, ds in (("train", train_ds), ("eval", eval_ds)) if ds is not None]
    report["truncation_warnings"] = [w for w in warnings if w]  # > half a split's pairs cut: also in the banner
    for warning in report["truncation_warnings"]:
        log.warning(warning)
    return train_ds, eval_ds, report
