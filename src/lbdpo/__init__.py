"""lbdpo: Direct Preference Optimization with a per-prompt, learnable β.

    β(x) = w · log PPL_πθ(x) · f(h),   f(h) = 1 + ε · tanh(NN(h))

Layers (lowest first; imports point down, ``tests/test_layout.py`` checks it):
``lbdpo.data`` + ``models`` (preference data → batches; loading HF models) → core: ``beta_head`` (the β
formula), ``losses`` (the DPO loss), ``logprobs`` (masked token log-probs), ``dpo_model`` (the one-pass
Learnable-β DPO forward), ``modeling`` (AutoModelForCausalLMWithBetaHead) → ``build`` (config → objects) →
``lbdpo.train`` → ``lbdpo.eval``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .beta_head import BetaHead, BetaHeadConfig
    from .dpo_model import DynamicBetaDPOModel
    from .modeling import AutoModelForCausalLMWithBetaHead

__version__ = "0.1.0"
__all__ = ["AutoModelForCausalLMWithBetaHead", "BetaHead", "BetaHeadConfig", "DynamicBetaDPOModel"]
_WHERE = {"BetaHead": "beta_head", "BetaHeadConfig": "beta_head", "DynamicBetaDPOModel": "dpo_model",
          "AutoModelForCausalLMWithBetaHead": "modeling"}


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (PEP 562): ``python -m lbdpo.experiment`` and the other commands that
    need no model start without importing torch and transformers (≈ 4 s)."""
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
