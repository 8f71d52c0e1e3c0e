"""FSDP2: 2 processes with the policy sharded agree with 1 unsharded process (CPU, gloo).

accelerate never selects FSDP on the CPU, so `tests/fsdp_train.py` switches a CPU
accelerator to FSDP2 by hand (see its docstring); sharding, gathering and the optimizer
are torch's and accelerate's real FSDP2 code.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from motg_fast.testing import tiny_qwen2
from motg_fast.training.checkpoint import list_checkpoints

pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")

HERE = Path(__file__).parent


def _run(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> dict:
    (ckpt,) = list_checkpoints(run_dir)
    return type(tiny_qwen2()).from_pretrained(ckpt / "model").state_dict()


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("layer_cls", ["", "Qwen2DecoderLayer"], ids=["one_unit", "layer_units"])
def test_two_process_fsdp2_run_agrees_with_one_process(tmp_path, layer_cls):
    """2 FSDP2 processes × 1 prompt vs 1 process × 2 prompts: same global batch, same update.

    Rollouts, old log-likelihoods and the checkpoint need the full parameters outside the
    scorer's forward (`motg_fast.training.distributed`); with them sharded the rollouts would read
    shards. `layer_units` also shards each decoder layer as its own unit. Tolerance: 1e-4
    absolute on metrics and weights, as for DDP (only the order of sums differs).
    """
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    port = ["--master_port", "29531" if layer_cls else "29529"]
    _run(
        [
            *torchrun,
            *port,
            str(HERE / "fsdp_train.py"),
            str(two),
            "1",
            "3",
            *([layer_cls] if layer_cls else []),
        ]
    )
    _run([sys.executable, str(HERE / "ddp_train.py"), str(one), "2", "3"])
    one_metrics, two_metrics = _metrics(one), _metrics(two)
    assert len(one_metrics) == len(two_metrics) == 3
    for a, b in zip(one_metrics, two_metrics):
        for key in ("reward", "loss", "kl", "completion_length", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert any(r["grad_norm"] > 0 for r in one_metrics)
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-4), name
    assert any(not torch.equal(w, tiny_qwen2().state_dict()[n]) for n, w in w1.items())
