"""Counting the aten ops of a training step on the CPU as a GPU run would see them (``host_ops.py`` uses it).

**The classification rule** (stated here because no tensor is on a GPU). A tensor is a *device* tensor when a GPU run
would hold it on the accelerator:

1. the parameters, buffers and gradients of the policy, the β head and the reference, and the optimizer's state
   (AdamW's ``step`` counters excepted: torch keeps them on the host unless the optimizer is fused or capturable);
2. a batch tensor once moved to the training device (accelerate's prepared loader and TRL's ``_prepare_inputs``
   call ``.to(device)``; on the CPU that is a no-op, so the move is made explicit: one copy, counted as a device op);
3. the output of an op that has a device tensor among its inputs;
4. the output of a factory op (no tensor input: ``zeros``, ``arange``, ``tensor``, …) called with a ``device=``
   argument that names the training device: the accelerator's device, or a device read from a device tensor's
   ``.device``. A device read from a host tensor's ``.device``, the string ``"cpu"`` and no device argument at all
   make a *host* tensor (what ``torch.tensor(list)`` in a collator or an index built from Python lists gives).

Everything else is a *host* tensor; so is the result of ``.cpu()`` / ``.to("cpu")`` of a device tensor. An op
counts as a *device* op when one of its tensors is a device tensor (rule 4 for factories), else as a *host* op. A
*sync* is an op that makes the host wait for the device: a read of a device tensor to the host (``.item()``,
``.tolist()``, ``float()`` / ``int()`` / ``bool()``, ``.cpu()``, ``.to("cpu")``, ``aten::_local_scalar_dense``,
``aten::equal``) and the ops whose output size depends on device values (``nonzero``, ``masked_select``, ``unique``,
boolean-mask indexing), each counted once (the ops a read dispatches inside are not counted again). Total = device +
host + syncs. AdamW runs as on a CUDA device (:func:`foreach_adamw`: ``foreach=True`` unless fused; TRL's default
and ``trainer=gpu``'s are fused), so that the optimizer's op count is a GPU's, not the CPU's per-tensor loop.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PHASES = ("forward", "backward", "clipping", "optimizer", "logging")
KINDS = ("device", "host", "sync")
# ops whose output size depends on device values: the host waits for the device to learn it
DATA_DEPENDENT = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "equal",
                  "_local_scalar_dense"}
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__float__, torch.Tensor.__int__,
         torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.cpu}


def call_site() -> str:
    """file:line of the innermost caller outside torch and this file (where a sync comes from)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/" not in name and name != __file__:
            return f"{'/'.join(Path(name).parts[-2:])}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class Ledger:
    """The kind (device or host) of every live tensor storage, and the counts of the current window."""

    def __init__(self):
        self.kinds: dict[int, str] = {}  # storage address → "device" | "host"
        self.devices: dict[int, tuple[torch.device, str]] = {}  # id of a torch.device read from a tensor → its kind
        self.counts: Counter = Counter()  # (phase, kind) → ops
        self.ops: Counter = Counter()  # (kind, op name) → ops, for the breakdown
        self.phase: str | None = None  # None: not counting
        self.paused = 0  # inside a counted read or move: its inner ops are not counted again
        self.factory: list[str] = []  # the kind a factory op called with a device= argument makes
        self.sync_sites: Counter = Counter()  # "phase: op at file:line" → syncs

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return 0

    def kind(self, t: torch.Tensor) -> str:
        return self.kinds.get(self._key(t), "host")

    def mark(self, tensors, kind: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and (key := self._key(t)):
                self.kinds[key] = kind

    def device_kind(self, device) -> str:
        """Rule 4: the kind of tensor that ``device=...`` (or ``.to(...)``) makes."""
        if isinstance(device, str):
            return "host" if device.split(":")[0] == "cpu" else "device"
        if isinstance(device, torch.device):
            seen = self.devices.get(id(device))
            return seen[1] if seen is not None and seen[0] is device else "device"
        return "host"

    def add(self, kind: str, name: str) -> None:
        if self.phase is not None and not self.paused:
            self.counts[self.phase, kind] += 1
            self.ops[kind, name] += 1
            if kind == "sync":
                self.sync_sites[f"{self.phase}: {name} at {call_site()}"] += 1


class DispatchCounter(TorchDispatchMode):
    """Counts every aten op by kind (see the module docstring) and marks the kind of its outputs."""

    def __init__(self, ledger: Ledger):
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        led, name = self.ledger, func.overloadpacket.__name__
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        kinds = [led.kind(t) for t in inputs]
        if name in ("copy_", "copy") and len(kinds) >= 2:  # dst.copy_(src): dst keeps its kind
            kind = "sync" if kinds[0] == "host" and kinds[1] == "device" else \
                ("device" if "device" in kinds else "host")
            led.add(kind, name)
            return out
        if inputs and not name.startswith("lift_fresh"):
            kind = "device" if "device" in kinds else "host"
        else:  # a factory (torch.tensor(data, device=...) lifts a fresh tensor)
            kind = led.factory[-1] if led.factory else "host"
        bool_index = name in ("index", "index_put", "index_put_") and any(
            t.dtype == torch.bool for t in inputs[1:])
        sync = kind == "device" and (name in DATA_DEPENDENT or bool_index or (
            name == "repeat_interleave" and kwargs.get("output_size") is None))
        led.add("sync" if sync else kind, name)
        led.mark(tree_flatten(out)[0], kind)
        return out


def _move_target(args, kwargs):
    """The device a ``Tensor.to(...)`` call names (None when it only changes the dtype)."""
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            return a
        if isinstance(a, torch.Tensor):
            return a
    return None


class FunctionCounter(TorchFunctionMode):
    """Reads of device tensors (syncs), moves between host and device, and the devices factories are given."""

    def __init__(self, ledger: Ledger):
        super().__init__()
        self.ledger = ledger

    def _paused(self, func, args, kwargs):
        self.ledger.paused += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.ledger.paused -= 1

    def _moved(self, func, args, kwargs, kind: str):
        """``func`` (a move) run without counting; its result a new tensor of ``kind`` (a copy, as on a GPU)."""
        out = self._paused(func, args, kwargs)
        if out.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr():
            out = self._paused(torch.Tensor.clone, (out,), {})
        self.ledger.mark([out], kind)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        led = self.ledger
        if getattr(func, "__self__", None) is torch.Tensor.device:  # t.device: remember whose device it is
            device = func(*args, **kwargs)
            led.devices[id(device)] = (device, led.kind(args[0]))
            return device
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if first is not None and func in READS and led.kind(first) == "device":
            led.add("sync", getattr(func, "__name__", str(func)))
            return self._moved(func, args, kwargs, "host") if func is torch.Tensor.cpu else \
                self._paused(func, args, kwargs)
        if first is not None and func is torch.Tensor.to and (target := _move_target(args, kwargs)) is not None:
            src = led.kind(first)
            dst = led.kind(target) if isinstance(target, torch.Tensor) else led.device_kind(target)
            if src != dst:
                led.add("sync" if src == "device" else "device", "to_" + dst)
                return self._moved(func, args, kwargs, dst)
        if func in (torch.from_numpy, torch.frombuffer, torch.as_tensor) and first is None and \
                kwargs.get("device") is None:  # wraps host memory without an aten op
            out = func(*args, **kwargs)
            led.mark([out], "host")
            return out
        if first is None and kwargs.get("device") is not None:  # a factory told where to allocate
            led.factory.append(led.device_kind(kwargs["device"]))
            try:
                return func(*args, **kwargs)
            finally:
                led.factory.pop()
        return func(*args, **kwargs)


def seed_device(ledger: Ledger, modules, optimizer) -> None:
    """Rule 1: parameters, buffers, gradients and optimizer state are device tensors (AdamW's host step counters
    excepted)."""
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            ledger.mark([p] + ([p.grad] if p.grad is not None else []), "device")
        ledger.mark(list(module.buffers()), "device")
    for group in optimizer.param_groups:
        on_device_step = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    ledger.mark([value], "device" if name != "step" or on_device_step else "host")


class Phases:
    """Switches ``ledger.phase`` while counting; ``start`` / ``stop`` open and close the counted window."""

    def __init__(self, ledger: Ledger):
        self.ledger, self.open = ledger, False

    def set(self, phase: str) -> None:
        if self.open:
            self.ledger.phase = phase

    def start(self) -> None:
        self.open, self.ledger.phase = True, "forward"

    def stop(self) -> None:
        self.open, self.ledger.phase = False, None

    def wrap(self, fn, phase: str, after: str | None = None):
        def wrapped(*args, **kwargs):
            self.set(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                if after:
                    self.set(after)
        return wrapped


def foreach_adamw(optimizer) -> None:
    """AdamW as on a CUDA device: one foreach op per group instead of the CPU's loop over tensors (unless fused)."""
    for group in optimizer.param_groups:
        if not group.get("fused"):
            group["foreach"] = True


def summary(ledger: Ledger) -> dict:
    by_phase = {p: {k: ledger.counts[p, k] for k in KINDS} for p in PHASES}
    top = {kind: [[name, n] for (k, name), n in ledger.ops.most_common() if k == kind][:8] for kind in KINDS}
    return {"phases": by_phase, "top": top, "syncs": dict(ledger.sync_sites)}
