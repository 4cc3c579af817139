"""Run ``train.py`` under Accelerate's FSDP on CPU processes (gloo), for the FSDP test.

Accelerate 1.15 turns FSDP on only for accelerator devices: on CPU processes it resolves the launch to MULTI_CPU
(plain DDP). This launcher changes only that decision (``AcceleratorState`` resolves to FSDP when
``ACCELERATE_USE_FSDP`` is set), so the test runs Accelerate's real FSDP2 wrapping, state-dict gathering and
optimizer sharding over gloo. Use it as ``torchrun --nproc_per_node 2 tests/launchers/fsdp_on_cpu.py <overrides>``
with the FSDP environment that ``accelerate launch --config_file conf/accelerate/fsdp.yaml`` would set.
"""

import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__
_plugin = []  # the FSDP plugin the Accelerator passed (later AcceleratorState() calls pass none)


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if kwargs.get("fsdp_plugin") is not None:
        _plugin[:] = [kwargs["fsdp_plugin"]]
    if self.distributed_type == DistributedType.MULTI_CPU and _plugin:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugin[0]


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
train_py = Path(__file__).resolve().parents[2] / "train.py"
sys.argv = [str(train_py), *sys.argv[1:]]
runpy.run_path(str(train_py), run_name="__main__")
