"""lbdpo: Direct Preference Optimization with a per-prompt, learnable β.

    β(x) = w · log PPL_πθ(x) · f(h),   f(h) = 1 + ε · tanh(NN(h))

Layers (lowest first; imports point down, ``tests/test_layout.py`` checks it):
``lbdpo.data`` + ``models`` (preference data → batches; loading HF models) → core: ``beta_head`` (the β
formula), ``losses`` (the DPO loss), ``logprobs`` (masked token log-probs), ``dpo_model`` (the one-pass
Learnable-β DPO forward), ``modeling`` (AutoModelForCausalLMWithBetaHead) → ``build`` (config → objects) →
``lbdpo.train`` → ``lbdpo.eval``.
"""

from .beta_head import BetaHead, BetaHeadConfig
from .dpo_model import DynamicBetaDPOModel
from .modeling import AutoModelForCausalLMWithBetaHead

__version__ = "0.1.0"
__all__ = ["AutoModelForCausalLMWithBetaHead", "BetaHead", "BetaHeadConfig", "DynamicBetaDPOModel"]
