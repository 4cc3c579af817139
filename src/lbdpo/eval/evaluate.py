"""``evaluate.py``'s body: sections run in order, and eval.json is rewritten after each one, so results
computed so far survive a failure in a later, optional step (generation, reward, plots).

The evaluation owns its output folder (:mod:`lbdpo.eval.output`): a second one into it stops at once; its files are
built in a staging folder of its own and put in place as one set when every section has run, so an error or a
signal (one line, exit code 128 + the signal: :class:`lbdpo.errors.Interrupted`) leaves the previous complete
results as they were; so does a write that fails (disk full, no permission: one :class:`lbdpo.errors.SaveError`
line naming the folder and its free space). A damaged checkpoint file is named in one line (:mod:`lbdpo.integrity`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from ..beta_modes import RULE_MODES, describe as describe_rule_mode
from ..beta_head import BetaHeadConfig
from ..build import build_datasets, to_container
from ..data.collator import PreferenceCollator
from ..data.tokenize import end_of_turn_ids, resolve_prompt_format
from ..dpo_model import DynamicBetaDPOModel
from ..models import freeze, load_model, reference_model_config
from ..modeling import AutoModelForCausalLMWithBetaHead
from ..train.reference import add_reference_columns, cached_generations
from ..train.signals import RaiseOnSignal, signal_name
from .output import RESULT, Results, commit, disk_full, owned_eval_dir, write_eval_pairs
from .pair_sample import pair_key
from .evaluation import (
    generate,
    generation_by_domain,
    kl_estimate,
    preference_eval,
    sample_logps,
    resolve_reward_fn,
    reward_comparison,
)
from ..errors import Interrupted, LbdpoError, MissingFileError
from ..integrity import check_intact, read_checked

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def forward_options(run_cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """The training run's forward options (:mod:`lbdpo.scoring`: every path gives the same numbers, tested), ``auto``
    resolved for this device. A run saved before ``trainer.forward`` existed: its ``trainer.pack_pairs``."""
    t = run_cfg.get("trainer") or {}
    forward = t.get("forward") or ("auto" if t.get("pack_pairs", True) else "rows")
    return {"forward": forward, "packed_attention": t.get("packed_attention") or "auto",
            "logps_chunk_size": t.get("logps_chunk_size"), "pad_to_multiple_of": t.get("pad_to_multiple_of"),
            "device": device}


def load_reference(cfg: DictConfig, run_cfg: DictConfig, vocab_size: int, device: torch.device, results: Results):
    """The run's frozen reference model, or None (``reference=none``, or it cannot be loaded: a skip with why)."""
    if cfg.reference == "none":
        results.skip("reference", "reference=none")
        return None
    try:
        ref_cfg = reference_model_config(to_container(run_cfg.model))
        return freeze(load_model(ref_cfg, vocab_size=vocab_size)).to(device)
    except Exception as err:  # a hub model without network, a moved local path, …
        results.skip("reference", f"could not load the reference {run_cfg.model.get('name_or_path')}: {err}")
        return None


def check_options(cfg: DictConfig) -> None:
    """The evaluation's own options, before anything loads (one line naming the key)."""
    from ..train.checks import number

    for key in ("batch_size", "generation.num_prompts", "generation.samples_per_prompt", "generation.max_new_tokens",
                "generation.batch_size"):
        if number(key, OmegaConf.select(cfg, key), int) < 1:
            raise LbdpoError(f"{key}={OmegaConf.select(cfg, key)} must be ≥ 1 (generation.enabled=false skips "
                             "generation)")
    if cfg.max_pairs is not None and number("max_pairs", cfg.max_pairs, int) < 1:
        raise LbdpoError(f"max_pairs={cfg.max_pairs} must be ≥ 1 (or null: data.max_eval_pairs)")
    if not isinstance(cfg.get("reference_cache"), bool):
        raise LbdpoError(f"reference_cache={cfg.get('reference_cache')!r} must be true or false")
    if cfg.reference not in ("auto", "none"):
        raise LbdpoError(f"reference={cfg.reference!r} must be auto (the checkpoint's reference model) or none")
    if not (cfg.device in ("auto", "cpu") or str(cfg.device).startswith("cuda")):
        raise LbdpoError(f"device={cfg.device!r} must be auto, cpu or cuda[:N]")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise LbdpoError(f"device={cfg.device} but no CUDA device is available (device=auto or cpu)")
    number("common_beta", cfg.common_beta)
    if cfg.output_dir and Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise LbdpoError(f"output_dir={cfg.output_dir} is a file, not a folder")


def check_checkpoint_folder(ckpt: Path) -> None:
    """A training checkpoint folder with every file evaluation reads, or one line saying what is missing."""
    if not (ckpt / "config.yaml").is_file():
        raise MissingFileError(f"{ckpt / 'config.yaml'} is missing: checkpoint= must be a training checkpoint "
                                "(outputs/<run>/checkpoints/final or step-N)")
    missing = [n for n in ("config.json", "beta_head.safetensors", "tokenizer_config.json") if not (ckpt / n).is_file()]
    if not list(ckpt.glob("model*.safetensors")) and not (ckpt / "adapter_model.safetensors").is_file():
        missing.append("model*.safetensors")
    if missing:
        raise MissingFileError(f"checkpoint={ckpt} is incomplete (missing {missing}): use another step-N or "
                                "checkpoints/final")
    check_intact(ckpt, DAMAGED_WHAT_TO_DO)


DAMAGED_WHAT_TO_DO = "evaluate another checkpoint of the run (checkpoints/step-N or final), or copy this one again"


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Run every evaluation section for ``cfg.checkpoint``; returns the eval.json content. The output folder is
    held for the evaluation and its files replaced as one set at the end (module doc).

    Raises:
        Interrupted: SIGINT / SIGTERM; the message says the folder keeps its previous complete results.
        RunStateError: another evaluation holds the output folder.
        SaveError: the results could not be written (disk full, no permission); the folder keeps the previous set.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_options(cfg)
    ckpt = Path(cfg.checkpoint)
    check_checkpoint_folder(ckpt)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else ckpt.parent.parent
    with RaiseOnSignal() as signals:
        try:
            with owned_eval_dir(out_dir) as staging:
                data = run_sections(cfg, ckpt, out_dir, staging)
                signals.hold()  # a few renames: never cut halfway, nor called stopped once done
                written = commit(staging, out_dir)
        except KeyboardInterrupt as err:
            none = "" if (out_dir / RESULT).is_file() else " (none: it holds no eval.json)"
            raise Interrupted(getattr(err, "signum", 2), f"{signal_name(err)}: evaluation stopped; {out_dir} keeps "
                              f"the previous complete results{none}") from None
    if signals.pending:
        log.warning("the stop request came as the results were being written: %s holds this evaluation whole", out_dir)
    log.info("wrote %s into %s", ", ".join(written), out_dir)
    return data


def run_sections(cfg: DictConfig, ckpt: Path, out_dir: Path, staging: Path) -> dict[str, Any]:
    """Every section, its files written into ``staging`` (figure paths recorded as they will be in ``out_dir``);
    returns the eval.json content."""
    run_cfg = OmegaConf.load(ckpt / "config.yaml")
    lm = AutoModelForCausalLMWithBetaHead.from_pretrained(ckpt)
    policy, tokenizer, head = lm.policy, lm.tokenizer, lm.beta_head
    run_dir = ckpt.parent.parent
    device = pick_device(cfg.device)
    policy.to(device)
    head.to(device)
    trainer_state = {}
    if (ckpt / "trainer_state.pt").is_file():
        trainer_state = read_checked(ckpt / "trainer_state.pt", lambda p: torch.load(p, map_location="cpu",
                                     weights_only=False), DAMAGED_WHAT_TO_DO)
    results = Results(staging / RESULT, {
        "checkpoint": str(ckpt),
        "step": trainer_state.get("state", {}).get("step"),
        "beta_head": dataclasses.asdict(head.config),
        "model": to_container(run_cfg.model),
        "seed": run_cfg.get("seed"),  # the training run's seed (its data order and held-out split)
        "eval_seed": int(cfg.seed),  # this evaluation's own (the sampled generations)
        "eval_id": staging.name.removeprefix(".eval-tmp-"),  # one evaluation: every file of the set is its
    })

    reference = load_reference(cfg, run_cfg, len(tokenizer), device, results)

    # ---- data --------------------------------------------------------------------------------
    data_cfg = cfg.data if cfg.get("data") else run_cfg.data
    data_cfg = OmegaConf.merge(data_cfg, {"max_eval_pairs": cfg.max_pairs or data_cfg.get("max_eval_pairs")})
    _, eval_ds, report = build_datasets(data_cfg, tokenizer, seed=int(run_cfg.get("seed", 0)), tokenize_train=False)
    results.set("data", {"eval_pairs": 0 if eval_ds is None else len(eval_ds), "filters": report})
    if eval_ds is None or len(eval_ds) == 0:
        results.skip("preference", "the data config has no eval split (set data.eval or data.eval_size)")
        raise LbdpoError(f"nothing to evaluate: the data config of {ckpt} has no held-out pairs; give "
                         "data.eval=FILE or data.eval_size=N (or data=<group> with an eval split)")

    # a bad reward name or reward-model path fails here, in one line, not after the preference pass
    reward_fn = resolve_reward_fn(data_cfg.get("reward") if cfg.reward == "auto" else cfg.reward, cfg.reward_model,
                                  device) if cfg.generation.enabled else None

    # ---- preference metrics ------------------------------------------------------------------
    # one forward for every score of this evaluation (the run's own: :mod:`lbdpo.scoring`), pairs and samples alike
    scored = DynamicBetaDPOModel(policy, head, ref_model=reference, **forward_options(run_cfg, device)).eval()
    per_pair = None
    if reference is not None:
        per_pair = run_preference(cfg, run_cfg, results, scored, tokenizer, eval_ds, device)
        write_eval_pairs(per_pair, staging / "eval_pairs.jsonl")
    else:
        results.skip("preference", "needs the reference model")

    # ---- generation, reward, KL ----------------------------------------------------------------
    samples_path = staging / "samples.jsonl"
    if cfg.generation.enabled and reference is not None:
        try:
            run_generation(cfg, run_cfg, results, scored, tokenizer, eval_ds, data_cfg, device, samples_path,
                           reward_fn)
        except Exception as err:
            if disk_full(err):  # the results cannot be written: stop (one SaveError line), not a recorded skip
                raise
            results.skip("generation", f"{type(err).__name__}: {err}")
            log.debug(traceback.format_exc())
    elif not cfg.generation.enabled:
        results.skip("generation", "generation.enabled=false")

    # ---- plots and report ----------------------------------------------------------------------
    figures: dict[str, str] = {}
    if cfg.plots:
        try:
            figures = {k: str(out_dir / Path(v).name) for k, v in make_plots(staging, run_dir, per_pair).items()}
        except Exception as err:
            if disk_full(err):
                raise
            results.skip("plots", f"{type(err).__name__}: {err}")
    results.set("figures", figures)
    (staging / "eval_report.md").write_text(render_report(results.data, samples_path))
    return results.data


def run_preference(cfg, run_cfg, results: Results, model: DynamicBetaDPOModel, tokenizer, eval_ds, device) -> dict:
    """The preference section of eval.json (own and common β, per domain); returns its per-pair lists. Reference
    log-probs of pairs scored before come from the per-pair store (``reference_cache``), the rest from the model's
    reference."""
    collator = PreferenceCollator(tokenizer.pad_token_id)
    if cfg.reference_cache:
        eval_ds = add_reference_columns(model.reference_logps, eval_ds, to_container(run_cfg.model), collator,
                                        int(cfg.batch_size), device, name="eval")
    results.set("reference_logps", "per-pair store" if cfg.reference_cache else "scored now")
    pref = preference_eval(model, eval_ds, collator, int(cfg.batch_size), float(cfg.common_beta), device)
    per_pair = pref.pop("per_pair")
    if {"prompt", "chosen", "rejected"} <= set(eval_ds.column_names) and len(eval_ds) == len(per_pair["domain"]):
        per_pair["key"] = [pair_key(*row) for row in zip(eval_ds["prompt"], eval_ds["chosen"], eval_ds["rejected"])]
    results.set("preference", pref)
    return per_pair


def run_generation(cfg, run_cfg, results: Results, scored: DynamicBetaDPOModel, tokenizer, eval_ds, data_cfg, device,
                   samples_path, reward_fn: Callable | None):
    """Greedy and sampled continuations of policy and reference; reward, win rate and MC KL when possible. The
    samples' log-probs come from ``scored``'s forward (its :class:`lbdpo.scoring.Scorer`), as the pairs' do.

    With ``generation.samples_per_prompt`` = k > 1 each prompt is sampled k times (the prompt list repeated k times;
    when N is a multiple of ``generation.batch_size`` the first N samples are the ones k = 1 draws): reward, win rate
    and KL average over all N·k samples (same estimand, less sampling noise; the KL's sem treats them as independent);
    samples.jsonl keeps the first sample's text and each prompt's mean over its k."""
    g = cfg.generation
    k = int(g.samples_per_prompt)
    policy, reference = scored.policy_model, scored.ref_model
    seen, prompts, texts, domains = set(), [], [], []
    for row in eval_ds:
        key = tuple(row["prompt_input_ids"])
        if key not in seen:
            seen.add(key)
            prompts.append(row["prompt_input_ids"])
            texts.append(row.get("prompt", ""))
            domains.append(row.get("domain", "all"))
        if len(prompts) >= int(g.num_prompts):
            break
    fmt = resolve_prompt_format(data_cfg.get("prompt_format", "auto"), tokenizer)
    eos = end_of_turn_ids(tokenizer, fmt) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    common = dict(max_new_tokens=int(g.max_new_tokens), batch_size=int(g.batch_size), device=device)
    gen = {}
    for who, model in (("policy", policy), ("reference", reference)):
        for mode in ("greedy", "sample"):
            rows = prompts * k if mode == "sample" else prompts  # greedy is deterministic: once per prompt
            def make(model=model, mode=mode, rows=rows):
                return generate(model, rows, tokenizer.pad_token_id, eos, sample=mode == "sample",
                                seed=int(cfg.seed), **common)
            if who == "reference" and cfg.reference_cache:  # the same in every run of an experiment: once
                gen[f"{who}_{mode}"] = cached_generations(
                    make, to_container(run_cfg.model), prompts=rows, mode=mode, seed=int(cfg.seed), eos=eos,
                    pad=tokenizer.pad_token_id, max_new_tokens=int(g.max_new_tokens), batch_size=int(g.batch_size))
            else:
                gen[f"{who}_{mode}"] = make()
    decoded = {key: [tokenizer.decode(ids, skip_special_tokens=True) for ids in v] for key, v in gen.items()}
    section: dict[str, Any] = {"num_prompts": len(prompts), "samples_per_prompt": k,
                               "max_new_tokens": int(g.max_new_tokens)}
    # KL(π‖πref) on the policy's own samples: log π − log πref of each sampled continuation
    pol, ref = (sample_logps(scored.scorer, model, prompts * k, gen["policy_sample"], tokenizer.pad_token_id,
                             int(g.batch_size), device) for model in (policy, reference))
    section["kl"] = kl_estimate(pol, ref)
    per_sample: dict[str, list[float]] = {"kl": (pol - ref).tolist()}  # N·k values, the k blocks one after another
    if reward_fn is not None:
        per_sample.update({f"reward_{key}": reward_fn(v) for key, v in decoded.items()})
        section["reward"] = reward_comparison(per_sample["reward_policy_sample"], per_sample["reward_reference_sample"])
        section["reward_greedy"] = reward_comparison(per_sample["reward_policy_greedy"],
                                                     per_sample["reward_reference_greedy"])
    section["per_domain"] = generation_by_domain(domains * k, per_sample["kl"], per_sample.get("reward_policy_sample"),
                                                 per_sample.get("reward_reference_sample"))
    n = len(prompts)
    per_prompt = {key: [sum(v[i::n]) / len(v[i::n]) for i in range(n)] for key, v in per_sample.items()}
    with open(samples_path, "w") as f:
        for i, prompt in enumerate(texts):
            f.write(json.dumps({"prompt": prompt, "domain": domains[i], **{key: v[i] for key, v in decoded.items()},
                                **{key: v[i] for key, v in per_prompt.items()}}, ensure_ascii=False) + "\n")
    results.set("generation", section)
    if reward_fn is None:
        results.skip("reward", "the eval data has no ground-truth reward (set reward= or reward_model=)")


def make_plots(out_dir: Path, run_dir: Path, per_pair: dict | None) -> dict[str, str]:
    from . import plots

    figures = {}
    if per_pair:
        path = plots.plot_beta_hist_by_domain(per_pair["beta"], per_pair["domain"], out_dir / "beta_hist_by_domain.png")
        if path:
            figures["beta_hist_by_domain"] = str(path)
        path = plots.plot_beta_vs_log_ppl(per_pair["beta"], per_pair["log_ppl"], per_pair["domain"],
                                          out_dir / "beta_vs_log_ppl.png")
        if path:
            figures["beta_vs_log_ppl"] = str(path)
    if (run_dir / "metrics.jsonl").is_file():
        path = plots.plot_training_curves(run_dir / "metrics.jsonl", out_dir / "training_curves.png")
        if path:
            figures["training_curves"] = str(path)
    return figures


def render_report(data: dict[str, Any], samples_path: Path) -> str:
    """eval_report.md: headline numbers, per-domain table, generation numbers, skipped sections, figures."""
    lines = [f"# Evaluation of `{data['checkpoint']}`", ""]
    head = data.get("beta_head", {})
    rule = describe_rule_mode(BetaHeadConfig.from_mapping(head), data.get("step")) \
        if head.get("mode") in RULE_MODES else None  # per_domain, schedule
    beta_desc = rule or (f"fixed β = {head.get('beta')}" if head.get("mode") == "fixed" else (
        f"learnable β: {head.get('ppl_transform')}, NN={head.get('context_net_type')}, ε={head.get('epsilon')}, "
        f"w_trainable={head.get('w_trainable')}, normalize={head.get('normalize')}"))
    lines += [f"- step: {data.get('step')}", f"- model: {data.get('model', {}).get('name_or_path')}",
              f"- β: {beta_desc}", f"- held-out pairs: {data.get('data', {}).get('eval_pairs')}", ""]
    pref = data.get("preference")
    if pref:
        cb = pref["common_beta_value"]
        lines += ["## Preference metrics (held-out pairs)", "",
                  f"| subset | pairs | acc | margin (own β) | loss (own β) | margin (β={cb}) | loss (β={cb}) | β mean ± std | log PPL |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rows = [("all", pref["num_pairs"], pref["own_beta"], pref["common_beta"])]
        rows += [(d, v["num_pairs"], v["own_beta"], v["common_beta"]) for d, v in pref["per_domain"].items()]
        for name, n, own, com in rows:
            lines.append(f"| {name} | {n} | {own['rewards/accuracies']:.3f} | {own['rewards/margins']:.3f} | "
                         f"{own['loss']:.4f} | {com['rewards/margins']:.3f} | {com['loss']:.4f} | "
                         f"{own['beta/mean']:.4f} ± {own['beta/std']:.4f} | {own['log_ppl/mean']:.3f} |")
        lines.append("")
    gen = data.get("generation")
    if gen:
        lines += ["## Generation", "", f"{gen['num_prompts']} held-out prompts × {gen.get('samples_per_prompt', 1)} "
                  f"samples, ≤ {gen['max_new_tokens']} new tokens; "
                  f"samples side by side in `{samples_path.name}`.", ""]
        kl = gen.get("kl")
        if kl:
            lines.append(f"- KL(π‖π_ref), Monte-Carlo on policy samples: {kl['mean']:.3f} ± {kl['sem']:.3f} nats (n={kl['n']})")
        for key, label in (("reward", "sampled"), ("reward_greedy", "greedy")):
            r = gen.get(key)
            if r:
                lines.append(f"- reward ({label}): policy {r['policy_mean']:.4f} vs reference {r['reference_mean']:.4f}; "
                             f"win rate {r['win_rate']:.3f}")
        lines.append("")
    if data.get("skipped"):
        lines += ["## Skipped sections", ""] + [f"- {k}: {v}" for k, v in data["skipped"].items()] + [""]
    if data.get("figures"):
        lines += ["## Figures", ""] + [f"![{k}]({Path(v).name})" for k, v in data["figures"].items()] + [""]
    return "\n".join(lines)
