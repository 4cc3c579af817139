"""``trainer.reference=precompute``: reference log-probs computed once, cached on disk, then the model freed;
and ``auto``, which picks it when it pays.

The cache is per pair: one store per reference model (its config hashed) maps each pair's digest (a hash of its
prompt, chosen and rejected token ids) to its two log-probs, so any change of model, data, chat template or
truncation is a miss, while the same pairs in another order or another seed's train/eval split are hits: a
seeded experiment scores its pairs once, not once per seed. Only the missing pairs are scored (in dataset order,
in batches of ``eval_batch_size``; a value does not depend on its batch-mates beyond float rounding, ~1e-6).

:func:`cached_generations` keeps the reference's continuations for ``evaluate.py`` the same way: every run of an
experiment generates from the same reference, prompts and sampling seed, so they are generated once.
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


def model_key(model_cfg: Mapping[str, Any]) -> str:
    """sha256 of the reference model's config (32 hex digits): the name of its per-pair store."""
    return hashlib.sha256(json.dumps(model_cfg, sort_keys=True, default=str).encode()).hexdigest()[:32]


def pair_digests(dataset: Dataset) -> list[bytes]:
    """One 16-byte blake2b digest per pair of its prompt, chosen and rejected token ids (lengths included)."""
    columns = [dataset[c] for c in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")]
    digests = []
    for ids in zip(*columns):
        h = hashlib.blake2b(digest_size=16)
        for part in ids:
            h.update(len(part).to_bytes(4, "little"))
            h.update(torch.tensor(part, dtype=torch.int64).numpy().tobytes())
        digests.append(h.digest())
    return digests


def reference_cache_key(model_cfg: Mapping[str, Any], dataset: Dataset) -> str:
    """sha256 of the model config and the dataset's token ids, in order: the key of the whole-dataset cache files
    written before the per-pair store (still read, so that such a cache is not scored again)."""
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


def _load_store(path: Path) -> dict[bytes, torch.Tensor]:
    """A per-pair store: {digest: (chosen, rejected) log-probs (2,)}; empty when the file does not exist."""
    if not path.is_file():
        return {}
    saved = torch.load(path)
    return {bytes(d.tolist()): v for d, v in zip(saved["digests"], saved["values"])}


def _save_store(path: Path, store: dict[bytes, torch.Tensor]) -> None:
    digests = torch.tensor([list(d) for d in store], dtype=torch.uint8).reshape(-1, 16)
    values = torch.stack(list(store.values())) if store else torch.zeros(0, 2)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed: never a partial cache file
    torch.save({"digests": digests, "values": values}, tmp)
    Path(tmp).replace(path)


def add_reference_columns(score: Callable[[dict], tuple[torch.Tensor, torch.Tensor]], dataset: Dataset,
                          model_cfg: Mapping[str, Any], collator: PreferenceCollator, batch_size: int,
                          device: torch.device, name: str) -> Dataset:
    """Dataset with ``reference_chosen_logps`` / ``reference_rejected_logps`` columns: each pair's from the
    model's per-pair store when it was scored before (in any order, split or run), the others scored now and added."""
    folder = cache_dir() / "reference_logps"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model_key(model_cfg)}.pairs.pt"
    digests = pair_digests(dataset)
    with scoring_lock(path):  # runs started side by side on a cold cache: one scores, the others wait and read it
        store = _load_store(path)
        missing = [i for i, d in enumerate(digests) if d not in store]
        changed = bool(missing)
        legacy = folder / f"{reference_cache_key(model_cfg, dataset)}.pt" if missing else None  # hashed only on a miss
        if legacy is not None and legacy.is_file():  # this very dataset, cached whole by an earlier version
            store.update(zip(digests, torch.load(legacy)))
            missing = []
        if missing:
            with scoring_threads():
                scored = compute_reference_logps(score, dataset.select(missing), collator, batch_size, device,
                                                 desc=f"reference {name}")
            store.update(zip((digests[i] for i in missing), scored))
        if changed:
            _save_store(path, store)
        log.info("reference log-probs for %s: %d of %d pairs from the cache %s, %d scored", name,
                 len(digests) - len(missing), len(digests), path, len(missing))
    values = torch.stack([store[d] for d in digests]) if digests else torch.zeros(0, 2)
    return (
        dataset.add_column("reference_chosen_logps", values[:, 0].tolist())
        .add_column("reference_rejected_logps", values[:, 1].tolist())
    )


def cached_generations(generate: Callable[[], list[list[int]]], model_cfg: Mapping[str, Any],
                       **settings: Any) -> list[list[int]]:
    """The reference model's continuations (token ids per prompt) for these ``settings`` (prompts, greedy or
    sampled, seed, lengths, batch size, stop ids: everything ``generate`` depends on), from
    ``<cache>/reference_generations/`` when generated before, else ``generate()`` — then stored. Keyed by the model
    config (:func:`model_key`) and the settings; a sampled continuation read back is the one a fresh call drew
    with that seed (bitwise when thread count and hardware match; else an equally valid draw)."""
    key = hashlib.sha256(json.dumps([model_key(model_cfg), settings], sort_keys=True, default=str).encode())
    path = cache_dir() / "reference_generations" / f"{key.hexdigest()[:32]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with scoring_lock(path):  # evaluations started side by side (runner --jobs N): one generates, the others read
        if path.is_file():
            log.info("reference generations read from %s", path)
            return json.loads(path.read_text())
        with scoring_threads():
            out = generate()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed
        tmp.write_text(json.dumps(out))
        tmp.replace(path)
    return out
