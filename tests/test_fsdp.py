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


# --------------------------------------------------------------------------------------
# Sharded checkpoints: kills, resume, the export, process counts
# --------------------------------------------------------------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _fsdp(run_dir: Path, port: str, changes: dict, kill: str | None = None, steps: int = 3):
    """The 2-process FSDP2 run of `fsdp_train.py` (checkpoint every step); `kill`
    (`TARGET:N`) SIGKILLs rank 0 there. Returns the finished process. β = 0: a resumed run
    reloads the reference policy from `config.model`, which these runs pass in instead."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOTG_KILL": kill or ""}
    args = [*TORCHRUN, "--master_port", port, str(HERE / "fsdp_train.py"), str(run_dir)]
    changes = {"save_every": 1, "keep_checkpoints": 0, "beta": 0.0, **changes}
    args += ["1", str(steps), "", json.dumps(changes)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def _last_weights(run_dir: Path) -> dict:
    return type(tiny_qwen2()).from_pretrained(list_checkpoints(run_dir)[-1] / "model").state_dict()


@pytest.mark.subprocess
@pytest.mark.slow
def test_fsdp2_run_killed_while_saving_and_between_steps_resumes_to_the_same_end(tmp_path):
    """Killed in the middle of the second checkpoint's shard writes, then after step 3's
    metrics (between checkpoints), each time resumed: the same metrics and weights as the
    uninterrupted run (exactly: sharded state is saved and loaded bit for bit)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _fsdp(whole, "29541", {}).returncode == 0
    first = _fsdp(killed, "29542", {}, kill="dcp.save:2")
    assert first.returncode != 0
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == [".step-000002.sharded", "step-000001"], names  # the write never committed
    second = _fsdp(killed, "29543", {"resume": True}, kill="metrics.append:2")
    assert second.returncode != 0, second.stderr[-2000:]
    third = _fsdp(killed, "29544", {"resume": True})
    assert third.returncode == 0, third.stderr[-3000:]
    timing = ("rollout_time", "train_time", "generated_tokens_per_s")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in _metrics(killed)]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in _metrics(whole)]
    a, b = _last_weights(whole), _last_weights(killed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not list((killed / "checkpoints").glob(".step-*"))


@pytest.mark.subprocess
@pytest.mark.slow
def test_the_consolidated_export_loads_with_transformers_and_matches_the_shards(tmp_path):
    """The checkpoint's `model/` (gathered by the main process) loads with
    `AutoModelForCausalLM` and gives the logits of the weights in the sharded files."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert _fsdp(run, "29545", {}, steps=2).returncode == 0
    ckpt = list_checkpoints(run)[-1]
    exported = AutoModelForCausalLM.from_pretrained(ckpt / "model").eval()
    sharded = tiny_qwen2().eval()
    state = {"model": {f"model.{k}": v for k, v in sharded.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(ckpt / "sharded"))
    sharded.load_state_dict({k.removeprefix("model."): v for k, v in state["model"].items()})
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, sharded(ids).logits)
    assert not torch.equal(exported(ids).logits, tiny_qwen2().eval()(ids).logits)  # trained


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_resume_with_another_process_count_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    assert _fsdp(run, "29546", {}, steps=1).returncode == 0
    done = subprocess.run(
        [sys.executable, str(HERE / "ddp_train.py"), str(run), "1", "2", '{"resume": true}'],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    assert "cannot resume a run of 2 process(es) with 1" in done.stderr


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("changes", [{"grad_accum": 2}, {"mu": 2}], ids=["grad_accum_2", "mu_2"])
def test_fsdp2_with_micro_batches_or_several_updates_agrees_with_one_process(tmp_path, changes):
    """As `test_two_process_fsdp2_run_agrees_with_one_process` (β > 0: the reference model
    is in both), with grad_accum = 2 or μ = 2: the same global batch, the same updates."""
    two, one = tmp_path / "two", tmp_path / "one"
    port = "29547" if "mu" in changes else "29548"
    args = [*TORCHRUN, "--master_port", port, str(HERE / "fsdp_train.py"), str(two), "2", "2"]
    _run([*args, "", json.dumps(changes)])
    _run([sys.executable, str(HERE / "ddp_train.py"), str(one), "4", "2", json.dumps(changes)])
    # With μ > 1 the logged loss and KL are averaged per process first, then over the
    # processes (DDP logs the same difference, 0.155 vs 0.156 here); gradients and weights
    # agree.
    keys = ("reward", "grad_norm") if "mu" in changes else ("reward", "loss", "kl", "grad_norm")
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    w1, w2 = _weights(one), _weights(two)
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-4), name
