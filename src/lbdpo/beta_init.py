"""The first-batch initialisations of a :class:`lbdpo.beta_head.BetaHead`, each run once:

- ``w_init=auto``: w = target_beta / mean_i T(PPL_i)·f_i over the (global) first finite batch, so that the batch-mean
  β equals ``target_beta`` (:func:`auto_init_w`);
- ``use_ppl_approx``: the approximation network's output bias shifted so that mean ℓ̂ = mean log PPL on the first
  finite batch (:func:`init_ppl_approx`).

Each has a done-flag, a bool buffer of the head (``w_initialized``, ``ppl_net_initialized``: saved with it, so a resumed
run does not initialise again), mirrored on the host (:class:`InitFlags`) so that a forward knows without reading the
device (on a GPU, ``if not bool(buffer)`` made every forward wait for the device). Where the buffer can change, and
the mirror with it:

- here, when an initialisation runs (:meth:`InitFlags.mark`: buffer and mirror together);
- a state dict loaded into the head (``load_state_dict``: resume, ``from_pretrained``, FSDP's ``set_model_state_dict``
  all call the head's ``_load_from_state_dict``, which calls :meth:`InitFlags.reload`: one read, at load time);
- DDP's broadcasts of process 0's buffers (when it wraps the model, and before each forward): they write the value
  every process already holds, because every process initialises on the same all-reduced batch mean and loads the
  same checkpoint.

Nothing else writes these buffers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import LbdpoError


class InitFlags(dict):
    """Name → done, the host mirror of a module's bool buffers of those names (the module is passed in, not held)."""

    def add(self, module: nn.Module, name: str, done: bool) -> None:
        """Register the buffer ``name`` (0-dim bool) on ``module``, and its mirror."""
        module.register_buffer(name, torch.tensor(done))
        self[name] = done

    def mark(self, module: nn.Module, name: str) -> None:
        """The initialisation ``name`` ran: its buffer and mirror set (no read)."""
        getattr(module, name).fill_(True)
        self[name] = True

    def reload(self, module: nn.Module) -> None:
        """After a state dict was loaded into ``module``: the mirrors from the buffers (one read each)."""
        for name in self:
            self[name] = bool(getattr(module, name))


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` (float32, 0-dim) over every process's batch (all-reduced under torch.distributed)."""
    mean = x.detach().float().mean()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        mean /= dist.get_world_size()
    return mean


@torch.no_grad()
def auto_init_w(head, g: torch.Tensor) -> None:
    """``w_init=auto``: w (and ``w_init_value``, the prior's anchor) = target_beta / mean g, g = T(PPL)·f (B,) — so
    that the (global) batch-mean β equals target_beta. A non-finite mean (a NaN batch, which the trainer skips) leaves
    w as it is, for the next batch; reads the device, but only until it has run."""
    mean_g = global_mean(g)
    if not torch.isfinite(mean_g):
        return
    if not mean_g > 0:
        raise LbdpoError(f"beta_head.w_init='auto' cannot be set: mean of T(PPL)·f on the first batch is {mean_g}")
    w = head.config.target_beta / mean_g
    if head.log_w is not None:
        head.log_w.copy_(torch.log(w))
    else:
        head.w.copy_(w)
    head.w_init_value.copy_(w)
    head.init_flags.mark(head, "w_initialized")


def init_ppl_approx(head, approx: torch.Tensor, log_ppl: torch.Tensor) -> torch.Tensor:
    """``use_ppl_approx``: shift the approximation's output bias by mean(log PPL − ℓ̂) over the (global) batch, once
    it is finite. ``approx`` ℓ̂ (B,), ``log_ppl`` (B,) → ℓ̂ (B,) as the shifted network gives it."""
    shift = global_mean(log_ppl.detach() - approx.detach())
    if not torch.isfinite(shift):
        return approx
    with torch.no_grad():
        [m for m in head.ppl_net.modules() if isinstance(m, nn.Linear)][-1].bias.add_(shift)
    head.init_flags.mark(head, "ppl_net_initialized")
    return approx + shift
