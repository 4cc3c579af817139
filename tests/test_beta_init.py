"""The BetaHead's first-batch initialisations (``lbdpo.beta_init``): once run — or loaded from a state dict — a
forward no longer reads the device to know, and a loaded head never initialises again."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lbdpo.beta_head import BetaHead, BetaHeadConfig

H = 16
READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.tolist,
         torch.Tensor.cpu}


class Reads(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host (a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func in READS
        return func(*args, **(kwargs or {}))


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, H, generator=g) * 3, torch.rand(6, generator=g) * 4 + 0.5


def auto_head(**kw):
    return BetaHead(BetaHeadConfig(hidden_size=H, w_init="auto", target_beta=0.25, epsilon=0.3, **kw))


@pytest.mark.parametrize("extra", [{}, {"w_param": "log"}, {"use_ppl_approx": True}])
def test_a_forward_after_the_initialisation_reads_nothing(extra):
    head = auto_head(**extra)
    h, log_ppl = inputs(0)
    with Reads() as first:
        head(h, log_ppl=log_ppl)
    assert first.n > 0  # the initialisation itself checks its batch mean (once)
    assert head.init_flags == {name: True for name in head.init_flags} and bool(head.w_initialized)
    h2, log_ppl2 = inputs(1)
    with Reads() as later:
        head(h2, log_ppl=log_ppl2)
    assert later.n == 0


@pytest.mark.parametrize("extra", [{}, {"use_ppl_approx": True}])
def test_a_loaded_head_keeps_its_initialisation(extra):
    head = auto_head(**extra)
    h, log_ppl = inputs(0)
    head(h, log_ppl=log_ppl)
    fresh = auto_head(**extra)
    assert not any(fresh.init_flags.values())
    fresh.load_state_dict(head.state_dict())  # resume, from_pretrained, FSDP's set_model_state_dict
    assert all(fresh.init_flags.values())
    h2, log_ppl2 = inputs(1)
    with Reads() as reads:
        beta = fresh(h2, log_ppl=log_ppl2)
    assert reads.n == 0
    torch.testing.assert_close(beta, head(h2, log_ppl=log_ppl2), rtol=0, atol=0)  # not initialised again
    # and the other way: a state dict from before the initialisation makes a loaded head initialise
    fresh.load_state_dict(auto_head(**extra).state_dict())
    assert not any(fresh.init_flags.values())
    assert fresh(h2, log_ppl=log_ppl2).mean().item() == pytest.approx(0.25, rel=1e-5)


def test_a_non_finite_batch_leaves_the_flag_unset():
    head = BetaHead(BetaHeadConfig(hidden_size=H, w_init="auto", epsilon=0.0))
    head(torch.zeros(2, H), log_ppl=torch.tensor([float("nan"), 2.0]))
    assert head.init_flags == {"w_initialized": False} and not bool(head.w_initialized)
    head(torch.zeros(2, H), log_ppl=torch.tensor([1.0, 3.0]))
    assert head.init_flags == {"w_initialized": True} and bool(head.w_initialized)


def test_fixed_and_numeric_w_heads_have_nothing_to_initialise():
    assert BetaHead(BetaHeadConfig(mode="fixed", beta=0.1)).init_flags == {}
    numeric = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.05))
    assert numeric.init_flags == {"w_initialized": True}
    h, log_ppl = inputs(0)
    with Reads() as reads:
        numeric(h, log_ppl=log_ppl)
    assert reads.n == 0
