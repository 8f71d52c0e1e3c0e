"""`tests/ddp_train.py` with the policy sharded by FSDP2 (accelerate's `fsdp_version=2`).

torchrun --nproc_per_node 2 tests/fsdp_train.py RUN_DIR PROMPTS_PER_PROCESS STEPS [LAYER_CLS]

On a GPU machine this is what `accelerate launch --use_fsdp --fsdp_version 2` sets up. On
the CPU accelerate never selects FSDP (its `AcceleratorState` enables FSDP only for
multi-accelerator types; `--use_fsdp` without a GPU silently gives MULTI_CPU, i.e. DDP),
while torch's `fully_shard` itself runs on the CPU with gloo. So here the accelerator is
built for the CPU and then switched to FSDP2 by hand, before the trainer prepares the model:
the trainer then runs accelerate's real FSDP2 code (`fsdp2_prepare_model`, sharded
optimizer, DTensor-aware clipping, full state dict). LAYER_CLS (e.g. Qwen2DecoderLayer)
also makes each such layer its own FSDP unit (nested units); without it the whole policy
is one unit.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from ddp_train import main  # noqa: E402


def fsdp2_cpu_accelerator(layer_cls: str | None = None) -> Accelerator:
    """An `Accelerator` on the CPU (gloo) that prepares models with FSDP2."""
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        transformer_cls_names_to_wrap=[layer_cls] if layer_cls else None,
    )
    accelerator.state.fsdp_plugin = plugin
    # AcceleratorState copies PartialState's fields whenever it is built again: set both
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    assert accelerator.is_fsdp2
    return accelerator


if __name__ == "__main__":
    layer_cls = sys.argv[4] if len(sys.argv) > 4 else None
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), fsdp2_cpu_accelerator(layer_cls))
