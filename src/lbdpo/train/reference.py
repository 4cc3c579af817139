"""``trainer.reference=precompute``: reference log-probs computed once, cached on disk, then the model freed;
and ``auto``, which picks it when it pays.

The cache key hashes the reference model's config and every token id of the dataset (prompt, chosen,
rejected), so any change of model, data, chat template or truncation gives a new entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.collator import PreferenceCollator
from ..models import cache_dir

log = logging.getLogger(__name__)


def resolve_reference_mode(t: Mapping[str, Any], train_pairs: int, processes: int = 1) -> str:
    """``trainer.reference`` with ``auto`` resolved: ``precompute`` when the run reads every training pair at least
    once (one reference pass over the split then costs no more than a copy scoring each step's pairs, and the
    copy's memory is freed), else ``copy`` (a short run would score pairs it never reads: ``make train`` reads 240
    of the 1,749 sentiment pairs). Other modes are returned as they are.
    """
    mode = str(t["reference"])
    if mode != "auto":
        return mode
    per_step = int(t["batch_size"]) * int(t["gradient_accumulation_steps"]) * processes
    planned = int(t["max_steps"]) * per_step if t.get("max_steps") else int(t["num_epochs"]) * train_pairs
    mode = "precompute" if planned >= train_pairs else "copy"
    log.info("trainer.reference=auto → %s (the run reads %d pairs of a %d-pair training split)", mode, planned,
             train_pairs)
    return mode


def reference_cache_key(model_cfg: Mapping[str, Any], dataset: Dataset) -> str:
    """sha256 of the model config and the dataset's token ids."""
    h = hashlib.sha256(json.dumps(model_cfg, sort_keys=True, default=str).encode())
    for column in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        for ids in dataset[column]:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_reference_logps(score: Callable[[dict], tuple[torch.Tensor, torch.Tensor]], dataset: Dataset,
                            collator: PreferenceCollator, batch_size: int, device: torch.device,
                            desc: str = "reference log-probs") -> torch.Tensor:
    """Summed reference log-probs of every pair: (N, 2) float32, columns (chosen, rejected).

    ``score``: a collated batch → (chosen, rejected) log-probs, each (B,): the training forward's own reference
    (:meth:`lbdpo.dpo_model.DynamicBetaDPOModel.reference_logps`), so cached values are computed exactly as a
    frozen copy would compute them during training.
    """
    loader = DataLoader(dataset.with_format(columns=["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]),
                        batch_size=batch_size, shuffle=False, collate_fn=collator)
    out = []
    for batch in tqdm(loader, desc=desc, leave=False):
        chosen, rejected = score({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        out.append(torch.stack([chosen.float().cpu(), rejected.float().cpu()], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2)


@contextlib.contextmanager
def scoring_lock(path: Path):
    """An exclusive lock on ``<path>.lock`` (POSIX ``flock``; no lock elsewhere), released on exit or death."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def scoring_threads():
    """Torch threads while scoring: ``LBDPO_REFERENCE_THREADS`` when set (the experiment runner sets it to every
    core under ``--jobs N``, since the runs beside this one wait on :func:`scoring_lock`), else unchanged."""
    wanted, before = os.environ.get("LBDPO_REFERENCE_THREADS"), torch.get_num_threads()
    if wanted:
        torch.set_num_threads(int(wanted))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def add_reference_columns(score: Callable[[dict], tuple[torch.Tensor, torch.Tensor]], dataset: Dataset,
                          model_cfg: Mapping[str, Any], collator: PreferenceCollator, batch_size: int,
                          device: torch.device, name: str) -> Dataset:
    """Dataset with ``reference_chosen_logps`` / ``reference_rejected_logps`` columns, from the disk cache
    when this model + data were seen before."""
    key = reference_cache_key(model_cfg, dataset)
    path = cache_dir() / "reference_logps" / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with scoring_lock(path):  # runs started side by side on a cold cache: one scores, the others wait and read it
        if path.is_file():
            values = torch.load(path)
            log.info("reference log-probs for %s: cache hit %s", name, path)
        else:
            with scoring_threads():
                values = compute_reference_logps(score, dataset, collator, batch_size, device, desc=f"reference {name}")
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed: never a partial cache file
            torch.save(values, tmp)
            Path(tmp).replace(path)
    return (
        dataset.add_column("reference_chosen_logps", values[:, 0].tolist())
        .add_column("reference_rejected_logps", values[:, 1].tolist())
    )
