"""Evaluation of a checkpoint: held-out preference metrics, generations, and the reward-vs-KL point.

Used by ``evaluate.py``. Every section writes its results into one dict that the caller saves after each
section, so a failure in an optional step (generation, reward, plots) never loses what came before.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.collator import PreferenceCollator, pad_rows
from ..dpo_model import PER_PAIR_KEYS, DynamicBetaDPOModel
from ..losses import dpo_loss, logratio_margin
from ..metrics import preference_metrics, split_by_domain
from ..scoring import Scorer
from ..errors import LbdpoError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Preference metrics
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def preference_eval(model: DynamicBetaDPOModel, dataset, collator: PreferenceCollator, batch_size: int,
                    common_beta: float, device: torch.device) -> dict[str, Any]:
    """DPO metrics on held-out pairs with the run's own β(x) and with one common β (comparable across runs).

    Returns:
        ``own_beta`` and ``common_beta`` metric dicts, ``per_domain`` (domain → both dicts), and
        ``per_pair`` lists in dataset order (domain, β, log PPL, f, and the β-free margin
        Δ = (log πθ − log πref)(yw|x) − (log πθ − log πref)(yl|x); the pair is ranked right when Δ > 0).
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    values: dict[str, list[torch.Tensor]] = {k: [] for k in PER_PAIR_KEYS}
    domains: list[str] = []
    for batch in tqdm(loader, desc="preference eval", leave=False):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = model(batch)
        for k, v in out.per_pair().items():
            values[k].append(v.float().cpu())
        domains.extend(batch.get("domain") or ["all"] * out.losses.shape[0])
    pairs = {k: torch.cat(v) for k, v in values.items() if v}

    def common(sub: dict[str, torch.Tensor]) -> dict[str, float]:
        losses, cr, rr = dpo_loss(sub["policy_chosen_logps"], sub["policy_rejected_logps"],
                                  sub["reference_chosen_logps"], sub["reference_rejected_logps"], common_beta)
        return preference_metrics({**sub, "losses": losses, "chosen_rewards": cr, "rejected_rewards": rr,
                                   "beta": torch.full_like(losses, common_beta)})

    result: dict[str, Any] = {"own_beta": preference_metrics(pairs), "common_beta": common(pairs),
                              "common_beta_value": common_beta, "num_pairs": len(domains), "per_domain": {}}
    for domain, sub in split_by_domain(pairs, domains).items():
        result["per_domain"][domain] = {"num_pairs": len(sub["losses"]), "own_beta": preference_metrics(sub),
                                        "common_beta": common(sub)}
    margin = logratio_margin(pairs["policy_chosen_logps"], pairs["policy_rejected_logps"],
                             pairs["reference_chosen_logps"], pairs["reference_rejected_logps"])
    result["per_pair"] = {"domain": domains, "beta": pairs["beta"].tolist(), "log_ppl": pairs["log_ppl"].tolist(),
                          "f": pairs["f"].tolist(), "margin": margin.tolist()}
    return result


# ------------------------------------------------------------------------------------------------
# Generation, reward, KL
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, prompts: Sequence[list[int]], pad_token_id: int, eos_ids: Sequence[int], *, sample: bool,
             max_new_tokens: int, batch_size: int, seed: int, device: torch.device) -> list[list[int]]:
    """Continuations of tokenized prompts, batched with left padding.

    Sampling is plain ancestral sampling from the model (temperature 1, no top-k/top-p), which is what the
    Monte-Carlo KL estimate needs. Each continuation is cut after its first end-of-turn/EOS token.
    """
    torch.manual_seed(seed)
    outputs: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate (sample)" if sample else "generate (greedy)",
                      leave=False):
        ids, mask = pad_rows(prompts[start:start + batch_size], pad_token_id, padding_side="left")
        width = ids.shape[1]
        kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad_token_id, eos_token_id=list(eos_ids), **kwargs)
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            outputs.append(row[:cut])
    return outputs


@torch.no_grad()
def sample_logps(scorer: Scorer, model, prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_token_id: int,
                 batch_size: int, device: torch.device) -> torch.Tensor:
    """log π(y|x) summed over response tokens for each tokenized (prompt, response), e.g. generated samples:
    (N,) float32, in the order given.

    Scored by ``scorer`` (the run's forward, :mod:`lbdpo.scoring`, as its preference pairs are): the responses of one
    prompt go two to a pair (its chosen and rejected slots), so the packed forward computes a prompt once per two
    samples and lm_head runs on response positions only; an odd one out fills both slots. ``batch_size`` counts
    responses. An empty response scores one pad token (its log-prob is read, not used by callers).
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    pairs = [(idx[j], idx[min(j + 1, len(idx) - 1)]) for idx in by_prompt.values() for j in range(0, len(idx), 2)]
    out = torch.zeros(len(prompts))
    collator = PreferenceCollator(pad_token_id)
    per_batch = max(1, batch_size // 2)
    for start in range(0, len(pairs), per_batch):
        chunk = pairs[start:start + per_batch]
        batch = collator([{"prompt_input_ids": list(prompts[a]), "chosen_input_ids": list(responses[a]) or [pad_token_id],
                           "rejected_input_ids": list(responses[b]) or [pad_token_id]} for a, b in chunk])
        batch = {key: v.to(device) for key, v in batch.items() if torch.is_tensor(v)}
        logps = scorer.response_logps(model, batch).float().cpu()  # (2 · len(chunk),): chosen rows, then rejected
        for row, (a, b) in enumerate(chunk):
            out[a], out[b] = logps[row], logps[len(chunk) + row]
    return out


def kl_estimate(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> dict[str, float]:
    """Monte-Carlo KL(π‖πref) = E_{y~π}[log π(y|x) − log πref(y|x)] from samples of the policy."""
    diff = (policy_logps - reference_logps).double()
    n = diff.numel()
    return {"mean": diff.mean().item(), "std": diff.std().item() if n > 1 else 0.0,
            "sem": diff.std().item() / math.sqrt(n) if n > 1 else 0.0, "n": n}


def reward_comparison(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> dict[str, float]:
    """Mean rewards and the policy's win rate against the reference on the same prompts (ties count ½)."""
    p, r = torch.tensor(policy_rewards, dtype=torch.float64), torch.tensor(reference_rewards, dtype=torch.float64)
    wins = (p > r).double() + 0.5 * (p == r).double()
    return {"policy_mean": p.mean().item(), "reference_mean": r.mean().item(), "win_rate": wins.mean().item(),
            "policy_std": p.std().item() if len(p) > 1 else 0.0, "n": len(p)}


def generation_by_domain(domains: Sequence[str], kl: Sequence[float], policy_rewards: Sequence[float] | None,
                         reference_rewards: Sequence[float] | None) -> dict[str, dict[str, Any]]:
    """Per domain: the number of values (its prompts × samples per prompt), mean KL and (with rewards)
    :func:`reward_comparison` of its samples."""
    out = {}
    for domain in sorted(set(domains)):
        idx = [i for i, d in enumerate(domains) if d == domain]
        out[domain] = {"n": len(idx), "kl": sum(kl[i] for i in idx) / len(idx)}
        if policy_rewards is not None and reference_rewards is not None:
            out[domain]["reward"] = reward_comparison([policy_rewards[i] for i in idx],
                                                      [reference_rewards[i] for i in idx])
    return out


def resolve_reward_fn(name: str | None, reward_model: str | None, device: torch.device) -> Callable | None:
    """The ground-truth reward: ``sentiment`` (VADER), a HF sequence-classification path, or None."""
    if reward_model:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(reward_model)
            rm = AutoModelForSequenceClassification.from_pretrained(reward_model).to(device).eval()
        except (OSError, ValueError) as err:  # a missing path, or a hub id without network
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LbdpoError(f"reward_model={reward_model}: cannot load a sequence-classification model there "
                             f"({first}); pass a local folder with config.json and weights") from None

        @torch.no_grad()
        def score(texts: list[str]) -> list[float]:
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True).to(device)
            return rm(**enc).logits[:, -1].float().cpu().tolist()

        return score
    if name == "sentiment":
        from .rewards import sentiment_reward

        return sentiment_reward
    if name:
        raise LbdpoError(f"data.reward={name!r}: known rewards are 'sentiment' (or set reward_model=PATH)")
    return None
