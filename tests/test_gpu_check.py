"""`scripts/gpu_check.sh`: the CPU mode end to end, and the gate's parsing and bookkeeping."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

GPU_PARTS = [
    "pytest -m gpu",
    "bench/bench_training_kernels.py --benchmark-only",
    "bench/bench_mixture_step.py --benchmark-only",
    "bench/bench_rollout.py --benchmark-only",
    "bench/bench_train_step.py --benchmark-only",
]


@pytest.mark.subprocess
@pytest.mark.slow
def test_cpu_mode_skips_gpu_parts_in_one_line_each_and_reports(tmp_path):
    """Without CUDA: one `skipped:` line per GPU part, the GRPO step on the tiny CPU model,
    exit 0, a report and a JSON of every figure. compile_check (~70 s on 2 cores) is left to
    `--skip` here; the gate runs it by default, on a CPU too."""
    out = tmp_path / "gate"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(out), "--skip", "compile_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for part in GPU_PARTS:
        assert lines.count(f"skipped: {part} (no CUDA device)") == 1, done.stdout
    assert lines.count("skipped: compile_check (--skip)") == 1
    assert sum(line.startswith("skipped: GRPO step on the Qwen2.5-1.5B") for line in lines) == 1
    assert any(line.startswith("ok: GRPO step (tiny random Qwen2") for line in lines)
    assert not any(line.startswith(("FAILED", "TIMEOUT")) for line in lines)

    figures = json.loads((out / "figures.json").read_text())
    meta = figures["meta"]
    assert meta["cuda"] is False and meta["device"].startswith("CPU")
    assert meta["date"] and meta["torch"] and meta["command"].startswith("bash scripts/gpu_check")
    parts = figures["parts"]
    assert list(parts) == gpu_check.ORDER
    assert parts["pytest_gpu"] == {"status": "skipped", "reason": "no CUDA device"}
    step = parts["grpo_step"]
    assert step["status"] == "ok" and (out / step["log"]).exists()
    assert abs(step["figures"]["ratio_mean"] - 1) < 1e-4
    assert step["figures"]["ratio_max_abs_dev"] < 1e-4 and step["figures"]["tokens"] > 0
    assert 0 <= step["figures"]["clip_fraction"] <= 1
    report = (out / "report.md").read_text()
    assert report.startswith("## GPU gate")
    assert "| pytest -m gpu | skipped | – | no CUDA device |" in report
    assert "| clip_fraction |" in report and "```bash\nbash scripts/gpu_check.sh" in report


def test_usage_errors():
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True)
    assert done.returncode == 2 and b"usage" in done.stderr
    with pytest.raises(SystemExit):
        gpu_check.main(["out", "--skip", "bench_everything"])


COMPILE_LOG = """\
target cuda sm_90, shared memory limit 227 KB
kernel                         status regs  spill stack smem KB  w/s mma    ptrs  constexprs
------------------------------------------------------------------------------------------
_embed_fwd_kernel              ok       32      0     0     2.0  4/3 -      *bf16,*i64  BLOCK_K=2
logprobs_fwd_partial_kernel   SPILL   255     64     0    96.0  8/3 wgmma  *bf16  K=2
_step_noise_kernel             FAIL   K_PAD=2  [step noise]
    error: something
[not covered] _new_kernel: no launch case compiles it
4 kernel variants, 3 problem(s)
"""


def test_compile_check_summary():
    summary = gpu_check.compile_check_summary(COMPILE_LOG)
    assert summary["target"] == "sm_90"
    assert (summary["variants"], summary["problems"], summary["max_registers"]) == (4, 3, 32)
    assert summary["issues"] == [
        "_step_noise_kernel FAIL",
        "logprobs_fwd_partial_kernel SPILL",
        "[not covered] _new_kernel: no launch case compiles it",
    ]
    assert gpu_check.compile_check_summary("killed")["variants"] is None


def test_junit_counts(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1" time="3.5">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = gpu_check.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (2, 1, 1, 1)
    assert counts["failed_tests"] == ["tests.test_a::test_bad", "tests.test_b::test_err"]


def test_report_renders_benchmarks_and_gpu_environment():
    bench = {
        "benchmarks": [
            {
                "name": "test_mixture_logprobs_fwd_bwd[chunked-8192]",
                "group": "mixture_logprobs fwd+bwd N=8192",
                "stats": {"min": 0.0123, "median": 0.0125, "mean": 0.013, "rounds": 5},
                "extra_info": {"impl": "chunked", "N": 8192, "peak_extra_mib": 1536.0, "gbps": 1.5},
            }
        ]
    }
    meta = dict(
        date="2027-01-02T03:04:05+00:00",
        command="bash scripts/gpu_check.sh out",
        cuda=True,
        device="NVIDIA H100 80GB HBM3",
        capability="9.0",
        memory_gib=79.1,
        sms=132,
        driver="550.0",
        torch_cuda="12.4",
        torch="2.13.0",
        triton="3.9.0",
        git_commit="0123456789abcdef",
        git_dirty=False,
    )
    parts = {
        "bench_training_kernels": dict(
            status="ok",
            seconds=42.0,
            selection="8192",
            figures={"benchmarks": gpu_check.benchmark_rows(bench)},
        ),
        "bench_train_step": dict(status="skipped", reason="does not fit"),
    }
    report = gpu_check.render_report(meta, parts)
    assert (
        "Device: NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB, 132 SMs, driver 550.0, CUDA 12.4)"
        in report
    )
    assert "Commit 0123456789ab. Command:" in report
    row = "| mixture_logprobs fwd+bwd N=8192 | chunked-8192 | 12.30 ms | 12.50 ms | 13.00 ms | 5 |"
    assert row + " peak_extra_mib=1536, gbps=1.5 |" in report
    assert "| bench/bench_train_step.py --benchmark-only | skipped | – | does not fit |" in report


def test_parts_fail_time_out_and_respect_the_budget(tmp_path, monkeypatch, capsys):
    """A failing part and a part past its limit are reported (its process group ended) and make
    the exit status 1; a part with less than MIN_PART_S left is skipped for the budget."""
    monkeypatch.setattr(gpu_check, "environment", lambda command, budget: {"cuda": True})
    gate = gpu_check.Gate(tmp_path, budget=60, full=False, skip=set(), command="test")
    failed = gate.finish(gate.start("pytest_gpu", [sys.executable, "-c", "exit(3)"]), 10)
    assert failed["status"] == "failed" and failed["returncode"] == 3
    start = time.monotonic()
    sleeper = [sys.executable, "-c", "import subprocess, sys; subprocess.run(['sleep', '30'])"]
    slow = gate.finish(gate.start("grpo_step", sleeper), 1)
    assert slow["status"] == "timeout" and time.monotonic() - start < 10
    gate.deadline = time.monotonic() + gpu_check.MIN_PART_S / 2
    assert gate.precheck("bench_rollout", (80, 600), needs_cuda=True) is None
    assert gate.parts["bench_rollout"]["reason"] == "time budget of 60 s spent"
    gate.report_line("pytest_gpu")
    assert "FAILED: pytest -m gpu" in capsys.readouterr().out
    gpu_check.write_outputs(tmp_path, {"date": "d", "command": "c"}, gate.parts)
    assert json.loads((tmp_path / "figures.json").read_text())["parts"]["grpo_step"]["status"] == (
        "timeout"
    )
