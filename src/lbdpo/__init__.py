"""lbdpo: Direct Preference Optimization with a per-prompt, learnable β.

    β(x) = w · log PPL_πθ(x) · f(h),   f(h) = 1 + ε · tanh(NN(h))

Modules: ``beta_head`` (the β formula), ``losses`` (the DPO loss), ``logprobs`` (masked token
log-probs), ``dpo_model`` (DynamicBetaDPOModel: one policy forward gives log-probs, log PPL and h),
``models`` (loading HF / embedded / tiny models), ``data`` (preference data pipeline).
"""

__version__ = "0.1.0"
