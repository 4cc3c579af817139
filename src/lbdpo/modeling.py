"""``AutoModelForCausalLMWithBetaHead``: any Hugging Face causal LM and its BetaHead as one object.

Like TRL's ``AutoModelForCausalLMWithValueHead``: one forward gives the LM's logits and, from the same pass, the
per-prompt β of Learnable-β DPO,

    β(x) = w · T(PPL_πθ(x)) · f(h),   log PPL(x) = mean NLL of the prompt's tokens 2..m,   h = h_L at token m

(see :mod:`lbdpo.beta_head`). ``beta(prompts)`` computes β for new prompts through the same chat template,
truncation and tokenization that training used. ``save_pretrained`` writes one folder:

    config.json, model*.safetensors, tokenizer files   the policy in plain HF format (LoRA: the adapter files,
                                                        and with ``merge_lora`` a full ``merged/`` copy)
    beta_head.safetensors, beta_head_config.json       the head's weights and its BetaHeadConfig
    lbdpo_config.json                                  prompt tokenization (format, max lengths), the base
                                                        model config (LoRA), provenance
    README.md                                          a model card

``AutoModelForCausalLM.from_pretrained(folder)`` loads the policy alone; ``from_pretrained(folder)`` here loads
both. Training checkpoints (``checkpoints/step-N``, ``checkpoints/final``) are such folders plus
``config.yaml`` and ``trainer_state.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from .beta_modes import describe as describe_rule_mode
from .beta_head import BetaHead, BetaHeadConfig
from .data.collator import pad_rows
from .data.tokenize import PairEncoder, TokenizeConfig
from .dpo_model import prompt_stats
from .scoring import hidden_at_prompt_end
from .logprobs import forward_model, token_logps
from .models import hidden_size_of, load_model, load_model_and_tokenizer, prepare_tokenizer
from .errors import HubUnreachableError, LbdpoError, MissingFileError
from .integrity import check_intact

HEAD_WEIGHTS, HEAD_CONFIG, LBDPO_CONFIG = "beta_head.safetensors", "beta_head_config.json", "lbdpo_config.json"
BUILTIN_SOURCES = ("smollm2_gguf", "tiny_random")  # model.source names accepted in place of a path


@dataclass
class CausalLMWithBetaHeadOutput(ModelOutput):
    """Output of :meth:`AutoModelForCausalLMWithBetaHead.forward`; N rows, T positions, V vocabulary."""

    logits: torch.Tensor | None = None  # (N, T, V) the policy's logits
    beta: torch.Tensor | None = None  # (N,) β(x) of each row's prompt
    log_ppl: torch.Tensor | None = None  # (N,) the prompt's log PPL under the policy
    hidden: torch.Tensor | None = None  # (N, H) h: last-layer hidden state at the prompt's last token
    f: torch.Tensor | None = None  # (N,) the head's context factor f(h)
    log_ppl_approx: torch.Tensor | None = None  # (N,) the head's approximation of log PPL (use_ppl_approx)
    beta_exact: torch.Tensor | None = None  # (N,) with use_ppl_approx: the β the exact log PPL would give


class AutoModelForCausalLMWithBetaHead(nn.Module):
    """A causal LM (``policy``, optionally peft-wrapped) and a :class:`BetaHead` (``beta_head``).

    Args:
        policy: the causal LM.
        beta_head: its β head (``hidden_size`` must match the policy's).
        tokenizer: the policy's tokenizer (needed by :meth:`beta`, :meth:`save_pretrained`).
        tokenize: how prompts were tokenized in training (``prompt_format``, ``max_prompt_length``, ...).
        base_model: the ``model`` config the policy was loaded from (saved; LoRA folders load their base with it).
    """

    def __init__(self, policy: nn.Module, beta_head: BetaHead, tokenizer=None,
                 tokenize: TokenizeConfig | Mapping[str, Any] | None = None, base_model: Mapping[str, Any] | None = None):
        super().__init__()
        self.policy = policy
        self.beta_head = beta_head
        self.tokenizer = tokenizer
        self.tokenize = tokenize if isinstance(tokenize, TokenizeConfig) else TokenizeConfig(**dict(tokenize or {}))
        self.base_model = dict(base_model or {})
        self._encoder = None

    # ---------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path | Mapping[str, Any], beta_head: BetaHeadConfig | Mapping | None = None,
                        **hf_kwargs: Any) -> "AutoModelForCausalLMWithBetaHead":
        """Load an lbdpo folder (policy + head) whole, or any other causal LM with a fresh head.

        Args:
            path_or_id: an lbdpo folder (``save_pretrained`` output, a training checkpoint); a hub id or local HF
                folder; ``"smollm2_gguf"`` / ``"tiny_random"``; or a ``model`` config mapping (as in ``conf/model``).
            beta_head: config of the fresh head (a BetaHeadConfig or a dict; default: BetaHeadConfig()); its
                ``hidden_size`` is taken from the model. Not allowed for an lbdpo folder, which has its head.
            **hf_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``trust_remote_code``, ...).
        """
        folder = Path(path_or_id) if isinstance(path_or_id, (str, Path)) else None
        if folder is not None and folder.is_dir() and ((folder / HEAD_CONFIG).is_file() or (folder / LBDPO_CONFIG).is_file()):
            if beta_head is not None:
                raise LbdpoError(f"{folder} already has a β head ({HEAD_CONFIG}); do not pass beta_head=")
            return cls._from_folder(folder, **hf_kwargs)
        if isinstance(path_or_id, Mapping):
            model_cfg = dict(path_or_id)
        elif str(path_or_id) in BUILTIN_SOURCES:
            model_cfg = {"source": str(path_or_id), "dtype": "float32"}
        else:
            model_cfg = {"source": "hub", "name_or_path": str(path_or_id), "dtype": "float32"}
        model_cfg.update({k: v for k, v in hf_kwargs.items() if k in ("dtype", "trust_remote_code", "revision")})
        if isinstance(model_cfg.get("dtype"), torch.dtype):  # saved in lbdpo_config.json: keep it a config name
            model_cfg["dtype"] = str(model_cfg["dtype"]).removeprefix("torch.")
        policy, tokenizer = load_model_and_tokenizer(model_cfg)
        head_cfg = beta_head if isinstance(beta_head, BetaHeadConfig) else BetaHeadConfig.from_mapping(beta_head or {})
        head_cfg = dataclasses.replace(head_cfg, hidden_size=hidden_size_of(policy))
        return cls(policy, BetaHead(head_cfg), tokenizer, base_model=model_cfg)

    @classmethod
    def _from_folder(cls, folder: Path, **hf_kwargs: Any) -> "AutoModelForCausalLMWithBetaHead":
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for needed in (HEAD_CONFIG, HEAD_WEIGHTS):
            if not (folder / needed).is_file():
                raise MissingFileError(f"{folder / needed} is missing: not a complete lbdpo model folder "
                                        "(save one with save_pretrained, or pass a plain HF model to get a fresh head)")
        check_intact(folder, "save or copy the folder again (a training checkpoint: use another step-N)",
                     skip=("trainer_state.pt", "config.yaml"))  # what a training checkpoint adds, not read here
        meta = json.loads((folder / LBDPO_CONFIG).read_text()) if (folder / LBDPO_CONFIG).is_file() else {}
        remote = {k: hf_kwargs[k] for k in ("trust_remote_code", "revision") if k in hf_kwargs}
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder, **remote), "right")
        if (folder / "adapter_config.json").is_file():
            from peft import PeftModel

            base = load_model(meta.get("base_model") or {}, vocab_size=len(tokenizer))
            policy = PeftModel.from_pretrained(base, folder)
        else:
            policy = AutoModelForCausalLM.from_pretrained(folder, **{"dtype": torch.float32, **hf_kwargs})
        head = BetaHead(BetaHeadConfig.from_mapping(json.loads((folder / HEAD_CONFIG).read_text())))
        hidden = hidden_size_of(getattr(policy, "base_model", policy) if hasattr(policy, "peft_config") else policy)
        if head.config.hidden_size != hidden:
            raise LbdpoError(f"{folder / HEAD_CONFIG}: hidden_size={head.config.hidden_size} but the model in "
                             f"{folder} has hidden size {hidden}")
        head.load_state_dict(load_file(folder / HEAD_WEIGHTS))
        model = cls(policy, head, tokenizer, tokenize=meta.get("tokenize"), base_model=meta.get("base_model"))
        return model.eval()

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompt_lengths: torch.Tensor | None = None,
                domains: Sequence[str] | None = None) -> CausalLMWithBetaHeadOutput:
        """Logits and β in one pass.

        Args:
            input_ids: (N, T); attention_mask: (N, T), any padding side (default: no padding).
            prompt_lengths: (N,) prompt tokens of each row; default: the whole row is the prompt.
            domains: N domain names (``beta_head=per_domain`` needs them).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prompt_lengths is None:
            prompt_lengths = attention_mask.long().sum(-1)
        out = forward_model(self.policy, input_ids, attention_mask, output_hidden_states=True)
        prompt_lengths = prompt_lengths.to(input_ids.device)
        h = hidden_at_prompt_end(out.hidden_states[-1], attention_mask, prompt_lengths)
        stats = prompt_stats(self.beta_head, token_logps(out.logits, input_ids), h, attention_mask, prompt_lengths,
                             domains)
        return CausalLMWithBetaHeadOutput(logits=out.logits, beta=stats.beta, log_ppl=stats.log_ppl,
                                          hidden=stats.hidden, f=stats.f, log_ppl_approx=stats.log_ppl_approx,
                                          beta_exact=stats.beta_exact)

    def encode_prompts(self, prompts: Sequence[str | Sequence[Mapping[str, str]] | Mapping[str, Any]]) -> list[list[int]]:
        """Token ids of each prompt exactly as training formats it: a string is one user message (or raw text
        for ``prompt_format=raw``), a list of ``{"role", "content"}`` messages a conversation, a mapping a row
        of :func:`lbdpo.data.load_preference_pairs`; left-truncated to ``max_prompt_length``."""
        if self.tokenizer is None:
            raise LbdpoError("this model has no tokenizer: pass tokenizer= or load it with from_pretrained")
        if self._encoder is None or self._encoder.config is not self.tokenize:  # tokenize may be reassigned
            self._encoder = PairEncoder(self.tokenizer, self.tokenize)
        rows = [{"prompt": p} if isinstance(p, str) else dict(p) if isinstance(p, Mapping) else
                {"prompt": p[-1]["content"], "prompt_messages": json.dumps(list(p))} for p in prompts]
        return [self._encoder.prompt_ids(row)[-self.tokenize.max_prompt_length:] for row in rows]

    @torch.no_grad()
    def beta(self, prompts: Sequence[str | Sequence[Mapping[str, str]]], batch_size: int = 16,
             domains: Sequence[str] | None = None) -> torch.Tensor:
        """β(x) of each prompt, (N,) float32 on the CPU. Under ``normalize=batch_mean`` a prompt's β depends on the
        other prompts of its batch of ``batch_size``, as in training; ``beta_head=per_domain`` needs ``domains``."""
        device = next(self.policy.parameters()).device
        ids = self.encode_prompts(prompts)
        out = []
        for start in range(0, len(ids), batch_size):
            input_ids, mask = pad_rows(ids[start:start + batch_size], self.tokenizer.pad_token_id, "right")
            part = None if domains is None else list(domains[start:start + batch_size])
            out.append(self(input_ids.to(device), mask.to(device), domains=part).beta.float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def generate(self, *args: Any, **kwargs: Any):
        """The policy's ``generate``."""
        return self.policy.generate(*args, **kwargs)

    # ---------------------------------------------------------------------------------------- saving

    def save_pretrained(self, directory: str | Path, model_card: str | None = None, merge_lora: bool = False,
                        provenance: Mapping[str, Any] | None = None,
                        state_dicts: tuple[dict, dict] | None = None) -> Path:
        """Write the folder described in the module docstring (``merge_lora``: also a merged ``merged/`` copy).
        ``state_dicts``: (policy, head) full state dicts to write instead of the modules' own (a sharded run's,
        gathered by :func:`lbdpo.train.sharded.gather_full_state`)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        policy_state, head_state = state_dicts or (None, self.beta_head.state_dict())
        self.policy.save_pretrained(directory, safe_serialization=True, state_dict=policy_state)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        if merge_lora and hasattr(self.policy, "merge_and_unload"):
            import copy

            merged = copy.deepcopy(self.policy).merge_and_unload()
            merged.save_pretrained(directory / "merged", safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(directory / "merged")
        state = {k: v.detach().contiguous().cpu() for k, v in head_state.items()}
        save_file(state, directory / HEAD_WEIGHTS)
        (directory / HEAD_CONFIG).write_text(json.dumps(dataclasses.asdict(self.beta_head.config), indent=2))
        meta = {"format": "lbdpo-1", "tokenize": dataclasses.asdict(self.tokenize), "base_model": self.base_model,
                **dict(provenance or {})}
        (directory / LBDPO_CONFIG).write_text(json.dumps(meta, indent=2, default=str))
        w = state["w"] if "w" in state else torch.exp(state["log_w"])  # gathered above (a DTensor shard under FSDP)
        (directory / "README.md").write_text(model_card or self.model_card(w=float(w)))
        return directory

    def model_card(self, eval_numbers: Mapping[str, float] | None = None, extra: str = "",
                   w: float | None = None) -> str:
        """A short README.md: base model, β configuration, how to load, and the eval numbers given."""
        c = self.beta_head.config
        w = float(self.beta_head.current_w().detach()) if w is None else w
        beta = describe_rule_mode(c) or (f"fixed β = {c.beta}" if c.mode == "fixed" else (f"β-DPO, β₀ = {c.beta}, α = {c.beta_dpo_alpha}, "
                                                                 f"filter ρ = {c.beta_dpo_filter}") if c.mode == "beta_dpo" else (
            f"β(x) = w · {c.ppl_transform}(x) · f(h), f = 1 + {c.epsilon}·tanh({c.context_net_type}(h)), "
            f"w = {w:.4g} ({('trainable, as log w' if c.w_param == 'log' else 'trainable') if c.w_trainable else 'fixed'}), normalize={c.normalize}"))
        lines = ["---", "library_name: transformers", "tags: [lbdpo, dpo]", "---", "",
                 "# Learnable-β DPO policy (lbdpo)", "",
                 f"- base model: `{self.base_model.get('name_or_path') or self.base_model.get('source', 'unknown')}`",
                 f"- β head: {beta}",
                 f"- prompt tokenization: {self.tokenize.prompt_format}, ≤ {self.tokenize.max_prompt_length} tokens", "",
                 "```python", "from lbdpo import AutoModelForCausalLMWithBetaHead",
                 "model = AutoModelForCausalLMWithBetaHead.from_pretrained(PATH)   # policy + β head",
                 "model.beta([\"How do I boil an egg?\"])                          # β per prompt",
                 "# the policy alone: transformers.AutoModelForCausalLM.from_pretrained(PATH)", "```", ""]
        if eval_numbers:
            lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in eval_numbers.items() if isinstance(v, float) and math.isfinite(v)]
            lines.append("")
        return "\n".join(lines) + extra

    def push_to_hub(self, repo_id: str, private: bool = True, folder: str | Path | None = None, **kwargs: Any) -> str:
        """Upload ``folder`` (default: a fresh ``save_pretrained`` of this model) to the hub repo ``repo_id``.
        Without network or credentials: one ``ConnectionError`` line, not a traceback."""
        import tempfile

        from huggingface_hub import HfApi

        with tempfile.TemporaryDirectory() as tmp:
            if folder is None:
                folder = self.save_pretrained(tmp)
            try:
                api = HfApi()
                api.create_repo(repo_id, private=private, exist_ok=True)
                api.upload_folder(folder_path=str(folder), repo_id=repo_id, **kwargs)
            except Exception as err:  # the hub client raises many types offline
                raise HubUnreachableError(f"push_to_hub({repo_id!r}) failed ({type(err).__name__}): no network or no "
                                      "Hugging Face credentials? Save with save_pretrained and upload later") from None
        return repo_id
