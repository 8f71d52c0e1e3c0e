"""The GPU gate: check and measure motg_fast on one GPU in one command, report ready to paste.

    bash scripts/gpu_check.sh OUT_DIR [--skip PART,...] [--full] [--budget SECONDS]

Parts, each in its own subprocess with its own time limit (log in `OUT_DIR/logs/PART.log`):

- `compile_check`: `scripts/compile_check.py`, every Triton kernel compiled for sm_90 (CPU
  work: it starts first and runs alongside the GPU parts; it needs no GPU, so it runs on a
  CPU machine too).
- `pytest_gpu`: `pytest -m gpu tests/` (the kernels at the real shapes, the CUDA engine).
- `grpo_step`: one GRPO step of `Trainer` (μ = 1, two micro-batches, bf16 autocast over
  float32 master weights) on a random Qwen2.5-1.5B-shaped `Qwen2ForCausalLM` with the tiny
  test tokenizer. Asserts that the importance ratios of the step are ≈ 1 (μ = 1: the
  rollout's log-probs and the training forward's must agree; `RATIO_TOLERANCE`) and that the
  step is finite; reports the clip fraction, times, peak memory and how many times the LM
  head was cast to bf16 (once per step, see `motg_fast/kernels/mixture_logprobs.py`). On a CPU it
  runs the same step on the tiny random Qwen2 of the tests instead (float32, the reference
  kernels), so the code path is exercised everywhere.
- `bench_training_kernels`, `bench_mixture_step`, `bench_rollout`, `bench_train_step`: the
  pytest-benchmark suites at their CUDA parametrisations (Qwen2.5-1.5B shapes: V = 151936,
  H = 1536), a subset with few rounds by default (`BENCH` below), all of them with `--full`.

A part that cannot run says so in one line (`skipped: PART (why)`): without CUDA the GPU
parts are skipped and the command still exits 0 when everything that ran passed. The
default `--budget` (450 s) keeps the whole gate under 8 minutes on one H100/H200: the part
time limits below sum to it, and a part that would start with less than `MIN_PART_S` left
is skipped for the budget. Exit status 1 when a part failed or hit its time limit.

Outputs: `OUT_DIR/report.md` (markdown for docs/benchmarks.md), `OUT_DIR/figures.json`
(every figure, with the device, date, versions and command), `OUT_DIR/bench_*.json`
(pytest-benchmark's own files) and the logs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEFAULT_BUDGET_S = 450.0
FULL_BUDGET_S = 1800.0
MIN_PART_S = 20.0
RATIO_TOLERANCE = 0.02  # |mean ratio − 1| and mean |ratio − 1| of a μ = 1 step

# Bench suites: file, default `-k` (None: not in the default gate, with the reason), `-k`
# with --full, time limit (default, full).
BENCH = {
    "bench_training_kernels": dict(
        file="bench/bench_training_kernels.py",
        k="(8192 or 16384) and not compiled",
        full_k=None,
        limit=(75, 600),
    ),
    "bench_mixture_step": dict(
        file="bench/bench_mixture_step.py", k="not compiled", full_k=None, limit=(50, 600)
    ),
    "bench_rollout": dict(
        file="bench/bench_rollout.py",
        k="gpu and (engine_mixture or compiled_decode)",
        full_k="gpu",
        limit=(240, 600),
    ),
    "bench_train_step": dict(
        file="bench/bench_train_step.py",
        k=None,
        skip_reason="six trainer steps of G = 10 × 512 tokens do not fit the 8-minute gate; "
        "run with --full",
        full_k="gpu",
        limit=(0, 600),
    ),
}
LIMITS = {"compile_check": (300, 600), "pytest_gpu": (180, 900), "grpo_step": (75, 300)}
ORDER = ["compile_check", "pytest_gpu", "grpo_step", *BENCH]


# ---------------------------------------------------------------------------------------
# Running the parts
# ---------------------------------------------------------------------------------------


class Gate:
    """Runs the parts in order within a time budget and collects their figures."""

    def __init__(self, out: Path, *, budget: float, full: bool, skip: set[str], command: str):
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.full = full
        self.skip = skip
        self.deadline = time.monotonic() + budget
        self.budget = budget
        self.parts: dict[str, dict] = {}
        self.meta = environment(command, budget)
        self.cuda = bool(self.meta.get("cuda"))

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, limits: tuple[int, int]) -> float:
        return min(limits[1] if self.full else limits[0], self.remaining())

    def skipped(self, name: str, reason: str) -> None:
        self.parts[name] = dict(status="skipped", reason=reason)
        print(f"skipped: {describe(name)} ({reason})", flush=True)

    def precheck(
        self, name: str, limits: tuple[int, int], needs_cuda: bool, excluded: str | None = None
    ) -> float | None:
        """The part's time limit, or None after reporting why it is skipped."""
        if name in self.skip:
            self.skipped(name, "--skip")
        elif needs_cuda and not self.cuda:
            self.skipped(name, "no CUDA device")
        elif excluded:
            self.skipped(name, excluded)
        elif self.limit(limits) < MIN_PART_S:
            self.skipped(name, f"time budget of {self.budget:.0f} s spent")
        else:
            return self.limit(limits)
        return None

    def start(self, name: str, argv: list[str], env: dict | None = None) -> Running:
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: a timeout ends all its children
        )
        return Running(name, argv, proc, log, time.monotonic())

    def finish(self, run: Running, limit: float) -> dict:
        """Wait for `run` up to `limit` seconds from its start; the part's record."""
        try:
            code = run.proc.wait(timeout=max(0.0, run.started + limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(run.proc.pid, signal.SIGKILL)  # the part's own process group
            run.proc.wait()
            code = None
        run.log.close()
        seconds = round(time.monotonic() - run.started, 1)
        record = dict(
            command=shlex.join(run.argv),
            seconds=seconds,
            log=str(Path("logs") / f"{run.name}.log"),
            returncode=code,
            status="timeout" if code is None else ("ok" if code == 0 else "failed"),
        )
        if code is None:
            record["reason"] = f"time limit {limit:.0f} s"
        self.parts[run.name] = record
        return record

    def report_line(self, name: str, detail: str = "") -> None:
        part = self.parts[name]
        status = {"ok": "ok", "failed": "FAILED", "timeout": "TIMEOUT"}[part["status"]]
        extra = f"; {part['reason']}" if part.get("reason") else ""
        detail = f"{detail}, " if detail else ""
        print(f"{status}: {describe(name)} ({detail}{part['seconds']:.0f} s{extra})", flush=True)

    # ----------------------------------------------------------------- the parts
    def run(self) -> int:
        background = None
        cc_limit = self.precheck("compile_check", LIMITS["compile_check"], needs_cuda=False)
        if cc_limit is not None:
            background = self.start("compile_check", [PY, "scripts/compile_check.py"])
        self.pytest_gpu()
        self.grpo_step()
        for name in BENCH:
            self.bench(name)
        if background is not None:
            record = self.finish(background, cc_limit)
            record["figures"] = compile_check_summary(self.read_log("compile_check"))
            figures = record["figures"]
            if record["status"] == "ok" or figures.get("variants") is not None:
                detail = f"{figures.get('variants')} kernel variants, "
                detail += f"{figures.get('problems')} problem(s)"
            else:
                detail = ""
            self.report_line("compile_check", detail)
        self.parts = {name: self.parts[name] for name in ORDER if name in self.parts}
        write_outputs(self.out, self.meta, self.parts)
        bad = [n for n, p in self.parts.items() if p["status"] in ("failed", "timeout")]
        print(f"report: {self.out / 'report.md'}; figures: {self.out / 'figures.json'}")
        return 1 if bad else 0

    def read_log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def pytest_gpu(self) -> None:
        limit = self.precheck("pytest_gpu", LIMITS["pytest_gpu"], needs_cuda=True)
        if limit is None:
            return
        xml = self.out / "pytest_gpu.xml"
        argv = [PY, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider"]
        argv += ["-rfE", "--durations=15", f"--junitxml={xml}"]
        record = self.finish(self.start("pytest_gpu", argv), limit)
        record["figures"] = junit_counts(xml) if xml.exists() else {}
        counts = record["figures"]
        detail = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
        self.report_line("pytest_gpu", detail if counts else "")

    def grpo_step(self) -> None:
        limit = self.precheck("grpo_step", LIMITS["grpo_step"], needs_cuda=False)
        if limit is None:
            return
        if not self.cuda:
            print(
                "skipped: GRPO step on the Qwen2.5-1.5B-shaped model in bf16 (no CUDA device; "
                "the same step runs on the tiny CPU model instead)",
                flush=True,
            )
        result = self.out / "grpo_step.json"
        argv = [PY, str(Path(__file__).relative_to(ROOT)), "--grpo-step", str(result)]
        record = self.finish(self.start("grpo_step", argv), limit)
        if result.exists():
            record["figures"] = json.loads(result.read_text())
        figures = record.get("figures", {})
        detail = ""
        if "ratio_mean" in figures:
            detail = f"{figures['model']}: ratio mean {figures['ratio_mean']:.4f}, "
            detail += f"clip fraction {figures['clip_fraction']:.4f}"
        self.report_line("grpo_step", detail)

    def bench(self, name: str) -> None:
        spec = BENCH[name]
        expr = spec["full_k"] if self.full else spec["k"]
        excluded = spec.get("skip_reason") if expr is None and not self.full else None
        limit = self.precheck(name, spec["limit"], needs_cuda=True, excluded=excluded)
        if limit is None:
            return
        result = self.out / f"{name}.json"
        argv = [PY, "-m", "pytest", spec["file"], "--benchmark-only", "-q"]
        argv += ["-p", "no:cacheprovider", f"--benchmark-json={result}"]
        if expr:
            argv += ["-k", expr]
        env = {} if self.full else {"MOTG_BENCH_ROUNDS": "5"}
        record = self.finish(self.start(name, argv, env), limit)
        record["selection"] = expr or "all"
        if result.exists():
            record["figures"] = {"benchmarks": benchmark_rows(json.loads(result.read_text()))}
        count = len(record.get("figures", {}).get("benchmarks", []))
        self.report_line(name, f"{count} cases" if count else "")


class Running:
    def __init__(self, name, argv, proc, log, started):
        self.name, self.argv, self.proc, self.log, self.started = name, argv, proc, log, started


def describe(name: str) -> str:
    return {
        "compile_check": "compile_check",
        "pytest_gpu": "pytest -m gpu",
        "grpo_step": "GRPO step",
    }.get(name, f"{BENCH[name]['file']} --benchmark-only" if name in BENCH else name)


# ---------------------------------------------------------------------------------------
# Environment and parsing
# ---------------------------------------------------------------------------------------

_ENV_PROBE = """
import json, platform, torch
info = dict(python=platform.python_version(), torch=torch.__version__,
            cuda=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
for name in ("triton", "transformers", "accelerate"):
    try:
        info[name] = __import__(name).__version__
    except Exception:
        info[name] = None
if info["cuda"]:
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                device_count=torch.cuda.device_count())
else:
    info["device"] = "CPU (" + (platform.processor() or platform.machine()) + ")"
print(json.dumps(info))
"""


def environment(command: str, budget: float) -> dict:
    """Device, versions, date, commit and the command of this run."""
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command,
        budget_s=budget,
        cpu_count=os.cpu_count(),
    )
    probe = subprocess.run([PY, "-c", _ENV_PROBE], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode == 0:
        meta.update(json.loads(probe.stdout.strip().splitlines()[-1]))
    else:
        meta.update(cuda=False, device="unknown", probe_error=probe.stderr[-500:])
    meta["driver"] = _run_text(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    )
    meta["git_commit"] = _run_text(["git", "rev-parse", "HEAD"])
    if meta["git_commit"] is not None:
        changes = _run_text(["git", "status", "--porcelain", "--untracked-files=no"])
        meta["git_dirty"] = changes is not None
    return meta


def _run_text(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else None


def junit_counts(xml: Path) -> dict:
    """`{passed, failed, errors, skipped, tests, seconds}` from a pytest JUnit XML file."""
    root = ElementTree.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: 0 for key in ("tests", "failures", "errors", "skipped")}
    seconds = 0.0
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, 0))
        seconds += float(suite.get("time", 0.0))
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    failed_names = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return dict(
        passed=passed,
        failed=total["failures"],
        errors=total["errors"],
        skipped=total["skipped"],
        tests=total["tests"],
        seconds=round(seconds, 1),
        failed_tests=failed_names,
    )


_CC_ROW = re.compile(r"^(\w+_kernel)\s+(ok|SPILL|SMEM|FAIL)\b")


def compile_check_summary(log: str) -> dict:
    """Variants, problems, target and the non-ok kernels from `compile_check.py` output."""
    summary = re.search(r"(\d+) kernel variants, (\d+) problem\(s\)", log)
    target = re.search(r"target cuda (sm_\d+)", log)
    rows = [m for m in map(_CC_ROW.match, log.splitlines()) if m]
    bad = sorted({f"{m.group(1)} {m.group(2)}" for m in rows if m.group(2) != "ok"})
    bad += re.findall(r"^\[(?:not covered|launcher error)\] .*$", log, flags=re.M)
    regs = [int(m.group(1)) for m in re.finditer(r"^\w+_kernel\s+ok\s+(\d+)", log, flags=re.M)]
    return dict(
        target=target.group(1) if target else None,
        variants=int(summary.group(1)) if summary else None,
        problems=int(summary.group(2)) if summary else None,
        max_registers=max(regs) if regs else None,
        issues=bad,
    )


def benchmark_rows(data: dict) -> list[dict]:
    """One row per benchmark of a pytest-benchmark JSON file: times in seconds + extra_info."""
    rows = []
    for bench in sorted(
        data.get("benchmarks", []), key=lambda b: (b.get("group") or "", b["name"])
    ):
        stats = bench.get("stats", {})
        rows.append(
            dict(
                name=bench.get("name"),
                group=bench.get("group"),
                min_s=stats.get("min"),
                median_s=stats.get("median"),
                mean_s=stats.get("mean"),
                rounds=stats.get("rounds"),
                extra_info=bench.get("extra_info", {}),
            )
        )
    return rows


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def seconds_text(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def render_report(meta: dict, parts: dict) -> str:
    """The markdown report: environment, one line per part, then each part's figures."""
    versions = ", ".join(
        f"{name} {meta.get(name)}"
        for name in ("torch", "triton", "transformers", "accelerate")
        if meta.get(name)
    )
    device = meta.get("device", "unknown")
    if meta.get("cuda"):
        device += f" (sm_{meta.get('capability', '?').replace('.', '')}, "
        device += f"{meta.get('memory_gib')} GiB, {meta.get('sms')} SMs, "
        device += f"driver {meta.get('driver')}, CUDA {meta.get('torch_cuda')})"
    commit = (meta.get("git_commit") or "unknown")[:12]
    if meta.get("git_dirty"):
        commit += " + uncommitted changes"
    lines = [
        f"## GPU gate (`scripts/gpu_check.sh`), {meta['date'][:10]}",
        "",
        f"Date: {meta['date']}. Device: {device}. Python {meta.get('python')}, {versions}. "
        f"Commit {commit}. Command:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        "| part | status | time | details |",
        "|---|---|---|---|",
    ]
    for name, part in parts.items():
        time_text = f"{part['seconds']:.0f} s" if "seconds" in part else "–"
        lines.append(f"| {describe(name)} | {part['status']} | {time_text} | {_details(part)} |")
    for name, part in parts.items():
        lines += _part_section(name, part)
    return "\n".join(lines) + "\n"


def _details(part: dict) -> str:
    figures = part.get("figures", {})
    if part["status"] == "skipped":
        return part["reason"]
    notes = [part["reason"]] if part.get("reason") else []
    if "passed" in figures:
        notes.append(", ".join(f"{figures[k]} {k}" for k in ("passed", "failed", "skipped")))
    if "variants" in figures:
        notes.append(f"{figures['variants']} variants, {figures['problems']} problem(s)")
    if "ratio_mean" in figures:
        notes.append(
            f"{figures['model']}: ratio mean {figures['ratio_mean']:.4f}, "
            f"clip fraction {figures['clip_fraction']:.4f}"
        )
    if "benchmarks" in figures:
        notes.append(f"{len(figures['benchmarks'])} cases, `-k {part.get('selection')}`")
    return "; ".join(notes)


def _part_section(name: str, part: dict) -> list[str]:
    figures = part.get("figures") or {}
    if not figures:
        return []
    lines = ["", f"### {describe(name)}", ""]
    if name == "pytest_gpu":
        failed = figures.get("failed_tests") or []
        lines.append(f"{figures['passed']} passed, {figures['failed']} failed, ")
        lines[-1] += f"{figures['errors']} errors, {figures['skipped']} skipped."
        lines += [f"- failed: `{test}`" for test in failed]
    elif name == "compile_check":
        lines.append(
            f"Target {figures.get('target')}: {figures.get('variants')} kernel variants, "
            f"{figures.get('problems')} problem(s), at most {figures.get('max_registers')} "
            "registers per thread."
        )
        lines += [f"- `{issue}`" for issue in figures.get("issues", [])]
    elif name == "grpo_step":
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in figures.items()]
    elif "benchmarks" in figures:
        lines.append("| group | case | min | median | mean | rounds | extra |")
        lines.append("|---|---|---|---|---|---|---|")
        for row in figures["benchmarks"]:
            extra = ", ".join(
                f"{k}={_cell(v)}"
                for k, v in row["extra_info"].items()
                if k not in ("device", "dtype", "impl", "N", "V", "H", "k")
            )
            case = re.sub(r"^test_\w+?\[(.*)\]$", r"\1", row["name"] or "")
            lines.append(
                f"| {row['group']} | {case} | {seconds_text(row['min_s'])} | "
                f"{seconds_text(row['median_s'])} | {seconds_text(row['mean_s'])} | "
                f"{row['rounds']} | {extra} |"
            )
    return lines


def write_outputs(out: Path, meta: dict, parts: dict) -> None:
    (out / "figures.json").write_text(json.dumps(dict(meta=meta, parts=parts), indent=2) + "\n")
    (out / "report.md").write_text(render_report(meta, parts))


# ---------------------------------------------------------------------------------------
# The GRPO step (run in a subprocess: `gpu_check.py --grpo-step RESULT.json`)
# ---------------------------------------------------------------------------------------


def checksum_reward(completions: list[str], items: list) -> tuple[list[float], list[float]]:
    """A deterministic reward that differs between completions (nonzero advantages)."""
    rewards = [zlib.crc32(text.encode()) % 1000 / 1000 for text in completions]
    return rewards, [0.0] * len(rewards)


def grpo_step(result_path: Path) -> int:
    """One GRPO step; writes its figures to `result_path`; 1 when a check fails."""
    import torch
    from transformers import Qwen2ForCausalLM

    from motg_fast.config import Config
    from motg_fast.kernels.mixture_logprobs import weight_casts_made
    from motg_fast.testing import ToyTasks, qwen25_1p5b_config, tiny_qwen2, tiny_tokenizer
    from motg_fast.training.trainer import Trainer

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    if cuda:
        config = qwen25_1p5b_config()
        config._attn_implementation = "sdpa"
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(config)
        label, group, new_tokens = "Qwen2.5-1.5B-shaped random Qwen2, bf16 autocast", 8, 256
    else:
        model = tiny_qwen2()
        label, group, new_tokens = "tiny random Qwen2 (CPU, float32)", 4, 16
    captured = []

    with tempfile.TemporaryDirectory() as run_dir:
        settings = dict(
            model="gpu-check",
            tasks="leg_counting",
            run_dir=run_dir,
            seed=0,
            k=2,
            selection="topk",
            weighting="dirichlet",
            likelihood="weighted",
            temperature=0.9,
            group_size=group,
            prompts_per_step=2,
            grad_accum=2,
            steps=1,
            lr=1e-6,
            max_new_tokens=new_tokens,
            max_prompt_tokens=512,
            save_every=0,
            progress=False,
            system_prompt="Answer.",
            final_eval="none",
        )
        trainer = Trainer(
            Config(**settings),
            model=model,
            tokenizer=tiny_tokenizer(),
            task_set=ToyTasks(),
            reward_fn=checksum_reward,
        )
        trainer.step.observers.append(
            lambda seen: captured.append((seen["logp"], seen["old_logp"], seen["mask"]))
        )
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        casts_before = weight_casts_made()
        start = time.perf_counter()
        record = trainer.train_step(0)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    figures = dict(
        model=label,
        parameters_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        rows=2 * group,
        max_new_tokens=new_tokens,
        micro_batches=2,
        step_s=round(wall, 3),
        rollout_s=round(record["rollout_time"], 3),
        train_s=round(record["train_time"], 3),
        completion_length=record.get("completion_length"),
        loss=record.get("loss"),
        grad_norm=float(record.get("grad_norm", float("nan"))),
        ratio_mean=record["ratio_mean"],
        clip_fraction=record["clip_fraction"],
        lm_head_casts=weight_casts_made() - casts_before,
    )
    if cuda:
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if captured:
        deviation = torch.cat(
            [((lp - old).float().exp() - 1)[m.bool()].abs() for lp, old, m in captured]
        )
        figures["ratio_mean_abs_dev"] = float(deviation.mean())
        figures["ratio_max_abs_dev"] = float(deviation.max())
        figures["tokens"] = int(deviation.numel())
    failures = []
    if abs(figures["ratio_mean"] - 1) > RATIO_TOLERANCE:
        failures.append(f"|ratio mean − 1| = {abs(figures['ratio_mean'] - 1):.4f}")
    if figures.get("ratio_mean_abs_dev", 0.0) > RATIO_TOLERANCE:
        failures.append(f"mean |ratio − 1| = {figures['ratio_mean_abs_dev']:.4f}")
    if not all(math.isfinite(figures[key]) for key in ("loss", "grad_norm")):
        failures.append("non-finite loss or gradient norm")
    if figures["lm_head_casts"] > 1:  # μ = 1: one cast serves every micro-batch of the step
        failures.append(f"the LM head was cast {figures['lm_head_casts']} times in one step")
    passed = f"ratios within {RATIO_TOLERANCE} of 1, finite, at most one LM-head cast"
    figures["checks"] = "; ".join(failures) or passed
    result_path.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", help="where the report, figures and logs go")
    parser.add_argument("--skip", default="", help=f"comma list of parts to skip: {ORDER}")
    parser.add_argument("--full", action="store_true", help="every bench case, more time")
    parser.add_argument("--budget", type=float, help="seconds for the whole gate (450; full 1800)")
    parser.add_argument("--grpo-step", metavar="RESULT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.grpo_step:
        return grpo_step(Path(args.grpo_step))
    if not args.out_dir:
        parser.error("OUT_DIR is required")
    skip = {name for name in args.skip.split(",") if name}
    unknown = skip - set(ORDER)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; parts: {ORDER}")
    budget = args.budget or (FULL_BUDGET_S if args.full else DEFAULT_BUDGET_S)
    command = os.environ.get("GPU_CHECK_COMMAND") or shlex.join([PY, *sys.argv])
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gate = Gate(out, budget=budget, full=args.full, skip=skip, command=command)
    return gate.run()


if __name__ == "__main__":
    sys.exit(main())
