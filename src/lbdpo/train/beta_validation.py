"""``beta_head.objective=validation``: the head β(x) trained on a held-out loss through a one-step look-ahead
hypergradient ("Learning to Reweight Examples", Ren et al. 2018), in place of the training loss's gradient.

Derivation. One optimizer step trains on N pairs (M micro-batches of b pairs on each of P processes, N = M·b·P):

    L(θ, φ) = (1/N) Σ_i ℓ(z_i),   z_i = β_i Δ_i,   ℓ(z) = −(1 − ε_ls) log σ(z) − ε_ls log σ(−z)   (losses.dpo_loss)

Δ_i(θ) is pair i's β-free log-ratio margin (the reference is fixed, so Δ depends on the policy θ only) and β_i(φ) the
head's β from the detached log PPL and h (``detach_ppl``/``detach_hidden``, required: β depends on φ only). So

    ∇θ L = Σ_i g_i ∇θ Δ_i,   g_i = β_i ℓ'(z_i) / N          (ε_ls = 0: g_i = −β_i σ(−z_i) / N)

Look one SGD step ahead, θ'(φ) = θ − η ∇θ L(θ, φ), and score the held-out pairs there with a FIXED β₀ (``val_beta``,
so L_val does not depend on φ): L_val(θ) = mean_j ℓ(β₀ Δ_j(θ)). Since ∇θ Δ_i does not depend on φ,

    dL_val(θ')/dφ = −η Σ_i (∂g_i/∂β_i) (∇θ Δ_i · ∇θ L_val(θ')) ∂β_i/∂φ
                  ≈ −η Σ_i (∂g_i/∂β_i) d_i ∂β_i/∂φ,     d_i = ∇θ Δ_i · v,   v = ∇θ L_val(θ)

(first order in η: v at θ instead of θ'; the two differ by O(η) relative), with

    ∂g_i/∂β_i = [ℓ'(z_i) + z_i ℓ''(z_i)] / N      (ε_ls = 0: −σ(−z_i) (1 − z_i σ(z_i)) / N, as the issue states).

So the head's gradient is ∇φ Σ_i c_i β_i(φ) with the detached scalars c_i = −η (∂g_i/∂β_i) d_i: β is recomputed from
the head on each micro-batch's stored, detached inputs (h, log PPL, domains), one small graph. ∂g_i/∂β_i is taken by
autograd from :func:`lbdpo.losses.dpo_loss` itself (label smoothing included; tested against the closed form).
A pair whose margin growth would raise the held-out loss (d_i > 0) gets a lower β where ∂g/∂β < 0 (z ≲ 1.28).

d_i, a directional derivative of Δ_i along v: a symmetric finite difference [Δ_i(θ + εv) − Δ_i(θ − εv)] / (2ε), two
no-grad forwards of the policy through ``torch.func.functional_call`` with parameters θ ± εv (tied weights kept tied;
nothing is changed in place, so nothing needs restoring), in eval mode (no dropout mask differs between the two) and
in float32 without autocast (mixed precision's rounding would swamp the difference). The reference cancels in the
difference. ε = :data:`FD_STEP` / ‖v‖: the perturbation has norm FD_STEP = 0.01 whatever v's scale. Relative error of
the hypergradient against the exact first-order one (double backward, eager attention, 2 × 3 random pairs), by the
perturbation's norm 0.001 / 0.01 / 0.03 / 0.1: tiny_random 1.2e-2 / 2.8e-3 / 1.4e-3 / 1.2e-2; SmolLM2-135M 7.4e-4 /
3.7e-3 / 3.0e-2 / 0.44 (rounding below, the margins' curvature along v above): 0.01 keeps both under 0.4 %.
``torch.func.jvp`` (forward-mode AD) was tried first: torch
2.13 has no forward AD for sdpa's attention kernel (NotImplementedError on tiny_random's Qwen2), so it would only run
with eager attention; the finite difference runs on every model and forward path.

η is the policy's current learning rate (the look-ahead is an SGD step; AdamW's preconditioning, clipping and weight
decay, which does not depend on φ, are left out, as in Ren et al.). The head's optimizer is Adam, which is nearly
invariant to a constant scale of its gradient, so η and 1/N set little beyond the relative weight of steps as the
policy's schedule moves η, and the weight of ``w_prior_weight``'s penalty, whose gradient is added as it is.

What the trainer does (:meth:`BetaValidation.record` after each training micro-batch's forward,
:meth:`BetaValidation.apply` after the last backward, before the gradient norms and clipping): on a step t with
t % ``val_every`` == 0, one held-out forward + backward at β₀ gives v and the logged held-out loss, then two
forwards per training micro-batch give d; the head's β parameters' gradients (w or log w, the context network; not
the ``use_ppl_approx`` network, which keeps its regression gradient; under ``beta_head=per_domain_learned`` its one
log β per domain, :mod:`lbdpo.beta_domains`) are replaced by the hypergradient; the policy's
gradient is untouched. On the other steps they get no gradient (None: AdamW skips them). Cost on a val step: one
micro-batch's forward + backward (and its reference forward with a reference copy) plus 2M policy forwards.

Held-out pairs: ``data.beta_val_fraction`` of the training split (:func:`lbdpo.data.loading.hold_out_pairs`), never
trained on. Step t's held-out micro-batch on process r is positions (t − 1)·b·P + r·b + j (j < b) of an endless stream
of the slice's seeded permutations (epoch e's from (seed, e)): a function of (seed, t), so a resumed run draws the
same pairs without a saved iterator, and P processes draw together the b·P pairs one process would with the same
global batch. Under DDP v is averaged across processes (one all-reduce of a policy-sized vector, as large as DDP's own
gradient all-reduce), so every process uses the one-process v; the head's hypergradient (a few parameters: small) is
averaged too. A non-finite held-out loss makes the head's gradient non-finite: the trainer's guard then skips the
step on every process. FSDP, DeepSpeed and ``trainer.compile`` are refused (:func:`check_launch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType
from omegaconf import DictConfig

from ..errors import LbdpoError
from ..losses import dpo_loss, logratio_margin

FD_STEP = 0.01  # ‖εv‖, the norm of the finite difference's perturbation of the policy's parameters (see the docstring)
DEFAULT_FRACTION = 0.1  # data.beta_val_fraction=null under objective=validation
Reduce = Callable[[torch.Tensor], torch.Tensor]  # a mean across processes


def beta_val_fraction(cfg: DictConfig) -> float:
    """``data.beta_val_fraction`` resolved: null → 0.1 under ``beta_head.objective=validation``, else 0; an explicit
    number applies to every objective (the same training pairs in every arm); checked in [0, 1)."""
    value = cfg.data.get("beta_val_fraction")
    validation = cfg.beta_head.get("objective", "dpo") == "validation"
    if value is None:
        return DEFAULT_FRACTION if validation else 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise LbdpoError(f"data.beta_val_fraction={value!r} must be a number in [0, 1) or null (0.1 under "
                         "beta_head.objective=validation, else 0)")
    if validation and value == 0:
        raise LbdpoError("data.beta_val_fraction=0 with beta_head.objective=validation: the head's loss needs "
                         "held-out pairs; set a fraction in (0, 1), or null (0.1)")
    return float(value)


def check_launch(cfg: DictConfig, accelerator: Accelerator) -> None:
    """Before any loading: the held-out fraction, and the launches objective=validation does not support."""
    beta_val_fraction(cfg)
    if cfg.beta_head.get("objective", "dpo") != "validation":
        return
    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise LbdpoError(f"beta_head.objective=validation under {str(kind).split('.')[-1]}: its hypergradient needs "
                         "the whole policy's parameters on each process (unsharded); launch DDP or one process, or "
                         "set beta_head.objective=dpo")
    if cfg.trainer.get("mixed_precision") == "fp16":
        raise LbdpoError("beta_head.objective=validation with trainer.mixed_precision=fp16: its held-out backward has "
                         "no loss scaling (fp16 gradients underflow); use bf16 or no")
    if cfg.trainer.get("compile"):
        raise LbdpoError("beta_head.objective=validation with trainer.compile=true: its finite-difference forwards "
                         "swap the policy's parameters, which a compiled decoder would recompile for; set "
                         "trainer.compile=false")


class HeldOutBatches:
    """Step t's held-out micro-batch on this process (see the module docstring): ``batch(t)``, a dict on ``device``.

    Args:
        ds: the held-out slice (tokenized, with reference columns under ``trainer.reference=precompute``);
        collator: the run's :class:`~lbdpo.data.collator.PreferenceCollator`; batch_size: b; seed: the run's seed;
        rank, processes: r and P.
    """

    def __init__(self, ds, collator, batch_size: int, seed: int, rank: int = 0, processes: int = 1,
                 device: torch.device | str = "cpu"):
        if len(ds) < batch_size * processes:
            raise LbdpoError(f"data.beta_val_fraction holds out {len(ds)} pairs, fewer than one held-out batch of "
                             f"{batch_size * processes} (trainer.batch_size × processes): raise the fraction")
        self.ds, self.collator, self.b, self.seed = ds, collator, int(batch_size), int(seed)
        self.rank, self.processes, self.device = int(rank), int(processes), device
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        """The slice's seeded permutation of pass ``epoch`` (a function of (seed, epoch))."""
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + 500_009 + epoch)).tolist()}  # only the current pass is kept
        return self._orders[epoch]

    def indices(self, step: int) -> list[int]:
        """The slice's rows of step ``step`` (1-based) on this process: b of them."""
        start = (step - 1) * self.b * self.processes + self.rank * self.b
        return [self.order(p // len(self.ds))[p % len(self.ds)] for p in range(start, start + self.b)]

    def batch(self, step: int) -> dict[str, Any]:
        batch = self.collator([self.ds[i] for i in self.indices(step)])
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class MicroBatch:
    """What the hypergradient needs of one training micro-batch: the batch (for the finite difference), the head's
    detached inputs ``hidden`` (B, H), ``log_ppl`` (B,), ``domains`` (B or None), and the margins Δ ``delta`` (B,)."""

    batch: dict[str, Any]
    hidden: torch.Tensor
    log_ppl: torch.Tensor
    domains: Sequence[str] | None
    delta: torch.Tensor

    @classmethod
    def of(cls, batch: dict[str, Any], out) -> "MicroBatch":
        """From a batch and the :class:`~lbdpo.dpo_model.DPOOutput` its training forward gave."""
        delta = logratio_margin(out.policy_chosen_logps.detach(), out.policy_rejected_logps.detach(),
                                out.reference_chosen_logps.detach(), out.reference_rejected_logps.detach())
        return cls(batch, out.hidden.detach(), out.log_ppl.detach(), batch.get("domain"), delta.float())


def beta_derivative_of_g(beta: torch.Tensor, delta: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """∂g_i/∂β_i · N, with g_i·N = ∂ℓ(β_i Δ_i)/∂Δ_i = β_i ℓ'(β_i Δ_i): (B,), (B,) → (B,) float64, by autograd through
    :func:`lbdpo.losses.dpo_loss` (ε_ls = 0: −σ(−z)(1 − z σ(z)), z = βΔ)."""
    with torch.enable_grad():
        b = beta.detach().double().requires_grad_(True)
        m = delta.detach().double().requires_grad_(True)
        zero = torch.zeros_like(m)
        losses = dpo_loss(m, zero, zero, zero, b, label_smoothing=label_smoothing)[0]
        (g,) = torch.autograd.grad(losses.sum(), m, create_graph=True)
        (dg,) = torch.autograd.grad(g.sum(), b)
    return dg


class _PolicyScore(nn.Module):
    """policy → log π(y|x) (2B,) of a batch by the model's scorer, as one module, so that ``functional_call`` on it
    swaps the policy's parameters for every submodule the scorer calls (decoder, lm_head), not only ``forward``."""

    def __init__(self, policy: nn.Module, scorer):
        super().__init__()
        self.policy, self.scorer = policy, scorer

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.scorer.response_logps(self.policy, batch)


@torch.no_grad()
def margin_derivatives(model, batch: dict[str, Any], params: dict[str, torch.Tensor], v: dict[str, torch.Tensor],
                       step: float = FD_STEP) -> torch.Tensor:
    """d_i = ∇θ Δ_i · v (B,) by the symmetric finite difference of the module docstring, ε = step / ‖v‖.

    Args:
        model: the :class:`~lbdpo.dpo_model.DynamicBetaDPOModel` (its policy and scorer); batch: a collated batch;
        params: the policy's trainable parameters by name (θ); v: a tensor of each one's shape (0 where ‖v‖ = 0).
    """
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in v.values()]))
    n = batch["prompt_lengths"].shape[0]
    if float(norm) == 0.0:
        return torch.zeros(n, device=batch["input_ids"].device)
    eps = step / norm
    policy = model.policy_model
    scored, was_training = _PolicyScore(policy, model.scorer), policy.training
    device_type = batch["input_ids"].device.type
    policy.eval()
    try:
        with torch.autocast(device_type, enabled=False):
            margins = []
            for sign in (1.0, -1.0):
                shifted = {f"policy.{k}": p + (sign * eps).to(p.dtype) * v[k] for k, p in params.items()}
                logps = torch.func.functional_call(scored, shifted, (batch,), tie_weights=True, strict=False).float()
                margins.append(logps[:n] - logps[n:])
                del shifted  # one shifted copy of the parameters at a time
    finally:
        policy.train(was_training)
    return (margins[0] - margins[1]) / (2 * eps.to(margins[0].device))


def flat_reduce(tensors: Sequence[torch.Tensor], reduce: Reduce | None) -> list[torch.Tensor]:
    """``reduce`` (a mean across processes) applied once to the tensors flattened into one vector; None: as they are."""
    if reduce is None or not tensors:
        return list(tensors)
    flat = reduce(torch.cat([t.reshape(-1) for t in tensors]))
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def heldout_gradient(model, batch: dict[str, Any], params: dict[str, torch.Tensor], val_beta: float):
    """(L_val detached 0-d, v by name): the held-out DPO loss at the fixed β₀ = ``val_beta`` of ``batch`` and its
    gradient v = ∇θ L_val over ``params`` (zeros for a parameter it does not reach), through ``model``'s own
    forward (the unwrapped model: no DDP hook; its mixed precision as in training); ``.grad`` is left untouched."""
    out = model(batch)
    losses = dpo_loss(out.policy_chosen_logps, out.policy_rejected_logps, out.reference_chosen_logps,
                      out.reference_rejected_logps, float(val_beta), label_smoothing=model.label_smoothing)[0]
    loss = losses.mean()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    v = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}
    return loss.detach(), v


def head_beta_parameters(head) -> list[nn.Parameter]:
    """The parameters β is made of (w or log w, the context network; per_domain_learned: its log β per domain): not
    the ``use_ppl_approx`` network's."""
    return [p for k, p in head.named_parameters() if p.requires_grad and not k.startswith("ppl_net.")]


def hypergradient(model, records: Sequence[MicroBatch], val_batch: dict[str, Any], eta: float, val_beta: float,
                  reduce: Reduce | None = None, fd_step: float = FD_STEP):
    """The head's look-ahead hypergradient of one optimizer step (the module docstring), at the current θ, φ.

    Args:
        model: the unwrapped :class:`~lbdpo.dpo_model.DynamicBetaDPOModel`; records: the step's training
            micro-batches (M of them, b pairs each); val_batch: the held-out micro-batch; eta: η; val_beta: β₀;
        reduce: the mean across processes (None in one process), applied to v, the hypergradient and the loss.

    Returns:
        (gradients, one per :func:`head_beta_parameters` entry; the held-out loss (float, mean over processes)).
    """
    params = {k: p for k, p in model.policy_model.named_parameters() if p.requires_grad}
    loss, v = heldout_gradient(model, val_batch, params, val_beta)
    v = dict(zip(v, flat_reduce(list(v.values()), reduce)))
    head, head_params = model.beta_head, head_beta_parameters(model.beta_head)
    objective = torch.zeros((), device=loss.device)
    for rec in records:
        d = margin_derivatives(model, rec.batch, params, v, fd_step)
        with torch.enable_grad():
            beta = head(rec.hidden, log_ppl=rec.log_ppl, domains=rec.domains)
        n = len(records) * beta.shape[0]  # N / P: pairs of this process's step (the mean across processes: 1/P)
        c = (-float(eta) * beta_derivative_of_g(beta, rec.delta, model.label_smoothing) / n * d.double()).float()
        objective = objective + (c.to(beta.device).detach() * beta).sum()
    grads = torch.autograd.grad(objective, head_params, allow_unused=True) if head_params else ()
    grads = flat_reduce([torch.zeros_like(p) if g is None else g for p, g in zip(head_params, grads)], reduce)
    return grads, float((reduce(loss.reshape(1)) if reduce is not None else loss).item())


class BetaValidation:
    """The trainer's side of ``objective=validation``: it records each training micro-batch and, once per optimizer
    step, puts the head's hypergradient in place of its DPO-loss gradient (see the module docstring)."""

    def __init__(self, heldout: HeldOutBatches, val_every: int, val_beta: float, accelerator: Accelerator):
        self.heldout, self.val_every, self.val_beta = heldout, int(val_every), float(val_beta)
        self.accelerator = accelerator
        self.records: list[MicroBatch] = []

    def record(self, batch: dict[str, Any], out) -> None:
        """After a training micro-batch's forward: keep what the hypergradient needs of it (detached)."""
        self.records.append(MicroBatch.of(batch, out))

    def apply(self, run) -> dict[str, float]:
        """After the step's last backward, before the norms: the head's β parameters get the hypergradient (plus
        the ``w_prior_weight`` penalty's gradient) on a val step, no gradient on the others. Returns the step's
        ``beta_val/…`` metrics (none on a step without the held-out pass)."""
        records, self.records = self.records, []
        step, model = run.state.step + 1, run.inner
        head_params = head_beta_parameters(model.beta_head)
        if step % self.val_every:
            for p in head_params:
                p.grad = None
            return {}
        eta = next(g["lr"] for g in run.optimizer.param_groups if g.get("name") == "policy")
        reduce = (lambda t: self.accelerator.reduce(t, reduction="mean")) if self.accelerator.num_processes > 1 \
            else None
        grads, loss = hypergradient(model, records, self.heldout.batch(step), eta, self.val_beta, reduce)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        with torch.enable_grad():
            prior = model.beta_head.regularization_loss()
        extra = torch.autograd.grad(prior, head_params, allow_unused=True) if prior.requires_grad else ()
        for i, p in enumerate(head_params):
            p.grad = grads[i] + (extra[i] if i < len(extra) and extra[i] is not None else 0)
        return {"beta_val/loss": loss, "beta_val/hypergrad_norm": norm, "beta_val/eta": float(eta)}


def build_beta_validation(cfg: DictConfig, accelerator: Accelerator, model, heldout_ds,
                          collator) -> BetaValidation | None:
    """The run's :class:`BetaValidation` under ``beta_head.objective=validation`` (None otherwise): the held-out
    slice's batches on this process; the policy's trainable parameters must be float32 (the finite difference)."""
    head = model.beta_head.config
    if head.objective != "validation":
        return None
    dtypes = {p.dtype for p in model.policy_model.parameters() if p.requires_grad}
    if dtypes - {torch.float32}:
        raise LbdpoError(f"beta_head.objective=validation needs float32 trainable policy weights (found "
                         f"{sorted(map(str, dtypes))}): set model.dtype=float32 (trainer.mixed_precision gives bf16 "
                         "compute); its finite difference is lost in bf16 rounding")
    heldout = HeldOutBatches(heldout_ds, collator, int(cfg.trainer.batch_size), int(cfg.seed),
                             accelerator.process_index, accelerator.num_processes, accelerator.device)
    return BetaValidation(heldout, head.val_every, head.val_beta, accelerator)
