"""Compile the Triton kernels for a GPU target ahead of time, without a GPU.

Triton's CPU interpreter runs code that a real GPU compile rejects (dot shapes, layouts,
shared memory, ptxas limits). This tool runs the real launchers on `meta` tensors of
realistic shapes; each kernel launch is intercepted, specialised exactly as the JIT would
specialise it (argument types, 16-byte alignment, constexprs, launch options) and compiled
with `triton.compile` for the target (default CUDA sm_90, Hopper) instead of being run. It
prints one row per distinct kernel variant: status, registers, spills, shared memory.

    python scripts/compile_check.py                    # all ops, sm_90
    python scripts/compile_check.py --ops embed,logprobs --arch 90
    python scripts/compile_check.py --ptxas-log        # full ptxas -v output per kernel

Exit status 1 when a kernel fails to compile, spills, or needs more shared memory than
`--smem-limit` bytes, or (all ops checked) when a `*_kernel` of the package is never
launched. The SM count used by the launch heuristics is `--sms` (132: H100 SXM).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import pkgutil
import re
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # must happen before the kernels are defined
os.environ.pop("MOTG_BACKEND", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

META = torch.device("meta")
V, H, N, K = 151936, 1536, 8192, 2  # Qwen2.5-1.5B-like vocabulary and width, 8k positions


class Recorder:
    """Stands in for `JITFunction.run`: compiles each distinct launch instead of running it."""

    def __init__(self, target: GPUTarget, ptxas_log: bool):
        self.target = target
        self.backend = make_backend(target)
        self.ptxas_log = ptxas_log
        self.case = ""
        self.rows: list[dict] = []
        self.seen: set[str] = set()

    def run(self, fn: JITFunction, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            self.backend, kwargs, bound_args, specialization, options
        )
        key = repr((fn.__name__, signature, constexprs, attrs, sorted(options.__dict__.items())))
        if key in self.seen:
            return None
        self.seen.add(key)
        row = dict(
            case=self.case,
            kernel=fn.__name__,
            consts=_describe_consts(fn, constexprs),
            sig=_describe_signature(signature),
            warps=options.num_warps,
            stages=options.num_stages,
        )
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(
                    ASTSource(fn, signature, constexprs, attrs),
                    target=self.target,
                    options=options.__dict__,
                )
        except Exception as exc:  # report and go on with the next kernel
            row.update(status="FAIL", error=_first_error_line(exc), trace=traceback.format_exc())
        else:
            row.update(
                status="ok",
                shared=compiled.metadata.shared,
                mma=_mma_kind(compiled.asm.get("ptx", "")),
                **_parse_ptxas(log.getvalue()),
            )
            if self.ptxas_log:
                row["log"] = log.getvalue()
        self.rows.append(row)
        return None


def _describe_consts(fn, constexprs) -> str:
    names = fn.arg_names
    parts = []
    for path, value in constexprs.items():
        if fn.params[path[0]].is_constexpr:
            parts.append(f"{names[path[0]]}={value}")
        else:  # an int argument equal to 1, specialised by the JIT
            parts.append(f"{names[path[0]]}=={value}")
    return " ".join(parts)


def _describe_signature(signature) -> str:
    """The pointer dtypes of the launch, e.g. `*bf16,*fp32`."""
    ptrs = [v for v in signature.values() if isinstance(v, str) and v.startswith("*")]
    return ",".join(sorted(set(ptrs)))


def _first_error_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line[:160]
    return (lines[0] if lines else type(exc).__name__)[:160]


def _mma_kind(ptx: str) -> str:
    """How the kernel's dots run: `wgmma` (Hopper), `mma` (tensor cores) or `-` (none)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if re.search(r"\bmma\.sync", ptx) else "-"


def _parse_ptxas(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return dict(
        regs=int(regs.group(1)) if regs else None,
        spills=(int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0),
        stack=int(stack.group(1)) if stack else 0,
    )


# ---------------------------------------------------------------------------------------
# Launch cases: the real launchers on meta tensors
# ---------------------------------------------------------------------------------------


def _module(name: str):
    return importlib.import_module(f"motg_fast.kernels.{name}")


def all_kernels() -> set[str]:
    """Names of every `@triton.jit` function named `*_kernel` in the kernels package."""
    package = importlib.import_module("motg_fast.kernels")
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = _module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                names.add(name)
    return names


def embed_cases(sms: int, ks: tuple[int, ...]):
    mod = _module("mixture_embed")
    for dtype in (torch.bfloat16, torch.float32):
        for w_dtype in sorted({dtype, torch.float32}, key=str):
            for k in ks:
                name = f"embed {_short(dtype)} w:{_short(w_dtype)} k={k}"
                emb = torch.empty(V, H, dtype=dtype, device=META)
                ids = torch.empty(N, k, dtype=torch.int64, device=META)
                w = torch.empty(N, k, dtype=w_dtype, device=META)
                grad = torch.empty(N, H, dtype=dtype, device=META)
                yield f"{name} fwd", lambda e=emb, i=ids, w=w: mod.launch_embed_forward(e, i, w)
                for det in (False, True):
                    for need_e, need_w in ((True, True), (True, False), (False, True)):

                        def bwd(g=grad, e=emb, i=ids, w=w, d=det, ne=need_e, nw=need_w):
                            mod.launch_embed_backward(
                                g, e, i, w, need_embedding=ne, need_weights=nw, deterministic=d
                            )

                        yield f"{name} bwd det={int(det)} dE={int(need_e)} dw={int(need_w)}", bwd


def logprobs_cases(sms: int, ks: tuple[int, ...]):
    """The forward and backward launches of `mixture_logprobs` (with and without the rest
    mass), planned for a GPU of `sms` SMs."""
    mod = _module("mixture_logprobs")
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True)):
        for n, k in [(N, k) for k in ks] + [(40, ks[0])]:
            for rest in (False, True):
                name = f"logprobs {_short(dtype)}{' tf32' if tf32 else ''} N={n} k={k}"
                name += " rest" if rest else ""
                h = torch.empty(n, H, dtype=dtype, device=META)
                w = torch.empty(V, H, dtype=dtype, device=META)
                ids = torch.empty(n, k, dtype=torch.int64, device=META)
                row = torch.empty(n, dtype=torch.float32, device=META)
                saved = (h, w, ids, row, row, row if rest else row[:0])
                g = (torch.empty(n, k, device=META), row, row, row)

                def fwd(h=h, w=w, ids=ids, tf32=tf32, rest=rest):
                    with _tf32(tf32):
                        mod.launch_logprobs_forward(h, w, ids, 0.7, rest, num_sms=sms)

                def bwd(saved=saved, g=g, tf32=tf32):
                    with _tf32(tf32):
                        mod.launch_logprobs_backward(saved, g, 0.7, True, True)

                yield f"{name} fwd", fwd
                yield f"{name} bwd", bwd


def step_cases(sms: int, ks: tuple[int, ...]):
    mod = _module("mixture_step")
    philox = importlib.import_module("motg_fast.kernels")  # StepNoise, philox_step_noise
    spec_type = _module("spec").MixtureSpec
    modes = (
        dict(selection="topk", weighting="prob", representative="argmax"),
        dict(selection="sample", weighting="gumbel", representative="sample", top_p=0.9),
        dict(selection="sample", weighting="prob", representative="sample", min_p=0.05),
        dict(selection="iid", weighting="uniform", representative="sample"),
        dict(selection="iid", weighting="gumbel", representative="argmax", min_p=0.05),
        dict(selection="sample_topk", weighting="blend", representative="first", top_p=0.9),
        dict(selection="topk", weighting="uniform", representative="first"),
    )
    # the largest noise tiles and running keys: iid's [K_PAD, BLOCK_V], k = 64
    heavy = [
        (mode, k) for mode in modes if mode["selection"] in ("iid", "sample_topk") for k in (8, 64)
    ]

    def step_case(dtype, emb, mode, batch, k, explicit=False):
        settings = dict(mode)
        if k == 1:  # top_p / min_p filter mixture slots: a spec rejects them at k=1
            settings.pop("top_p", None)
            settings.pop("min_p", None)
        spec = spec_type(k=k, **settings)
        splits = mod.split_count(batch, V, sms)
        name = f"step {_short(dtype)} {spec.selection}/{spec.weighting}/{spec.representative} "
        name += f"B={batch} k={k}" + (" explicit noise" if explicit else "")

        def launch():
            logits = torch.empty(batch, V, dtype=torch.float32, device=META)
            noise = None
            if explicit:  # every stream given: the kernels load noise instead of drawing it
                shape = mod.selection_noise_shape(spec, batch, V)
                slots = torch.empty(batch, k, device=META)
                weight = slots if spec.weighting == "gumbel" else None
                noise = philox.StepNoise(torch.empty(shape, device=META), weight, slots)
            mod.mixture_step_triton(logits, emb, spec, noise=noise, vocab_splits=splits)

        return name, launch

    for dtype in (torch.bfloat16, torch.float32):
        emb = torch.empty(V, H, dtype=dtype, device=META)
        for mode in modes:
            for batch, k in [(64, k) for k in ks] + [(512, k) for k in ks]:
                yield step_case(dtype, emb, mode, batch, k)
    emb = torch.empty(V, H, dtype=torch.bfloat16, device=META)
    for mode, k in heavy:
        for batch in (64, 512):
            yield step_case(torch.bfloat16, emb, mode, batch, k)
    for mode in modes[1], modes[3], modes[5]:
        for batch in (64, 512):
            yield step_case(torch.bfloat16, emb, mode, batch, 8, explicit=True)
    seed = torch.zeros(1, dtype=torch.int64, device=META)
    yield "step noise", lambda: philox.philox_step_noise(seed, 4, V, 2)
    yield "step noise iid", lambda: philox.philox_step_noise(seed, 4, V, 8, draws=8)


@contextlib.contextmanager
def _tf32(on: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


OPS = {"embed": embed_cases, "logprobs": logprobs_cases, "step": step_cases}


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {list(OPS)}")
    parser.add_argument("--arch", type=int, default=90, help="CUDA capability, e.g. 80, 90")
    parser.add_argument("--sms", type=int, default=132, help="SM count for launch heuristics")
    parser.add_argument("--k", default=f"{K},1", help="comma list of mixture sizes k")
    parser.add_argument("--smem-limit", type=int, default=227 * 1024, help="bytes per block")
    parser.add_argument("--ptxas-log", action="store_true", help="print ptxas -v per kernel")
    args = parser.parse_args(argv)
    ks = tuple(int(k) for k in args.k.split(","))

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    knobs.nvidia.dump_ptxas_log = True  # the ptxas -v report (registers, spills) on stdout
    knobs.compilation.always_compile = True
    cache = tempfile.TemporaryDirectory(prefix="compile_check_")  # leave the user cache alone
    knobs.cache.dir = cache.name
    recorder = Recorder(GPUTarget("cuda", args.arch, 32), args.ptxas_log)
    original_run = JITFunction.run
    JITFunction.run = lambda fn, *a, grid, warmup, **kw: recorder.run(
        fn, *a, grid=grid, warmup=warmup, **kw
    )
    failures = 0
    try:
        for op in args.ops.split(","):
            for case, launch in OPS[op](args.sms, ks):
                recorder.case = case
                try:
                    launch()
                except Exception as exc:  # a launcher that cannot run on meta tensors
                    print(f"[launcher error] {case}: {type(exc).__name__}: {exc}")
                    failures += 1
    finally:
        JITFunction.run = original_run
        cache.cleanup()

    header = (
        f"{'kernel':<30} {'status':<6} {'regs':>4} {'spill':>6} {'stack':>5} "
        f"{'smem KB':>7} {'w/s':>4} {'mma':<5}  {'ptrs':<22} constexprs  [first case]"
    )
    print(f"target cuda sm_{args.arch}, shared memory limit {args.smem_limit / 1024:.0f} KB")
    print(header)
    print("-" * len(header))
    for row in recorder.rows:
        if row["status"] == "ok":
            smem = row["shared"]
            bad = row["spills"] > 0 or smem > args.smem_limit
            failures += bad
            status = "ok" if not bad else ("SPILL" if row["spills"] else "SMEM")
            print(
                f"{row['kernel']:<30} {status:<6} {row['regs'] or '?':>4} {row['spills']:>6} "
                f"{row['stack']:>5} {smem / 1024:>7.1f} {row['warps']:>2}/{row['stages']} "
                f"{row['mma']:<5}  "
                f"{row['sig']:<22} {row['consts']}  [{row['case']}]"
            )
            if args.ptxas_log:
                print(row["log"])
        else:
            failures += 1
            print(
                f"{row['kernel']:<30} FAIL   {row['consts']}  [{row['case']}]\n    {row['error']}"
            )
    for row in recorder.rows:
        if row["status"] != "ok":
            print(f"\n--- {row['kernel']} [{row['case']}]\n{row['trace']}")
    if set(args.ops.split(",")) == set(OPS):  # every kernel must have been compiled
        missing = sorted(all_kernels() - {row["kernel"] for row in recorder.rows})
        for name in missing:
            print(f"[not covered] {name}: no launch case compiles it")
        failures += len(missing)
    print(f"{len(recorder.rows)} kernel variants, {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
