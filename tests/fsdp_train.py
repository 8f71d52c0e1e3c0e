"""`tests/ddp_train.py` with the policy sharded by FSDP2 (accelerate's `fsdp_version=2`).

torchrun --nproc_per_node 2 tests/fsdp_train.py RUN_DIR PROMPTS_PER_PROCESS STEPS \
    [LAYER_CLS] [CONFIG_JSON]

On a GPU machine this is what `accelerate launch --use_fsdp --fsdp_version 2` sets up. On
the CPU accelerate never selects FSDP (its `AcceleratorState` enables FSDP only for
multi-accelerator types; `--use_fsdp` without a GPU silently gives MULTI_CPU, i.e. DDP),
while torch's `fully_shard` itself runs on the CPU with gloo. So here the accelerator is
built for the CPU and then switched to FSDP2 by hand, before the trainer prepares the model:
the trainer then runs accelerate's real FSDP2 code (`fsdp2_prepare_model`, sharded
optimizer, DTensor-aware clipping, full state dict). LAYER_CLS (e.g. Qwen2DecoderLayer, or
"" for none) also makes each such layer its own FSDP unit (nested units); without it the
whole policy is one unit. CONFIG_JSON: config changes (e.g. '{"resume": true}').

`MOTG_KILL=TARGET:N` SIGKILLs rank 0 at the N-th call of TARGET: `dcp.save` (every process's
shard write of a checkpoint; the kill lands while the shards are half written) or
`metrics.append` (after a step's metrics, between checkpoints).
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch.distributed.checkpoint as dcp  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from ddp_train import main  # noqa: E402

from motg_fast.training import metrics  # noqa: E402


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


def kill_rank0_at(target: str, count: int) -> None:
    """SIGKILL rank 0 at the `count`-th call of `target` (see the module docstring)."""
    calls = [0]

    def wrap(original, after_half=None):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == count and os.environ.get("RANK", "0") == "0":
                if after_half is not None:
                    after_half(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        return wrapper

    if target == "dcp.save":
        original = dcp.save

        def half_written(state, *, checkpoint_id, **kwargs):
            Path(checkpoint_id, "__0_0.distcp").write_bytes(b"partial")

        dcp.save = wrap(original, half_written)
    elif target == "metrics.append":
        metrics.MetricsLog.append = wrap(metrics.MetricsLog.append)
    else:
        raise ValueError(f"unknown kill target {target!r}")


if __name__ == "__main__":
    layer_cls = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
    changes = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    if os.environ.get("MOTG_KILL"):
        target, count = os.environ["MOTG_KILL"].split(":")
        kill_rank0_at(target, int(count))
    accelerator = fsdp2_cpu_accelerator(layer_cls)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), accelerator, **changes)
