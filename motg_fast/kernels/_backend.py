"""Backend choice for every op: the pure-PyTorch reference or the Triton kernel.

`backend=None` picks automatically: Triton for CUDA tensors when Triton imports, the
reference elsewhere. `backend="reference"` or `backend="triton"`
forces a path; the environment variable `MOTG_BACKEND` (same values) forces it globally when
no explicit `backend` is given. On a CPU, Triton runs only in its interpreter
(`TRITON_INTERPRET=1`, set before the kernels are imported).
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("reference", "triton")
ENV_VAR = "MOTG_BACKEND"

try:  # Triton is optional: macOS, Windows and CPU-only installs may lack it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None
    HAS_TRITON = False


def jit(fn):
    """`triton.jit` where Triton is installed; elsewhere the kernel stays a plain function
    (never launched: `resolve_backend` does not pick Triton then)."""
    return triton.jit(fn) if triton is not None else fn


def constexpr(value):
    """`tl.constexpr(value)` where Triton is installed, else the plain value."""
    return tl.constexpr(value) if tl is not None else value


def device_guard(device: torch.device):
    """Make `device` current: Triton launches on the current CUDA device and its stream."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def triton_interpreter_on() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(
    op: str, backend: str | None, device: torch.device, auto_cpu: str = "reference"
) -> str:
    """Return "reference" or "triton" for one call of `op` on tensors living on `device`
    (or `auto_cpu` when chosen automatically where Triton does not run).

    Raises ValueError for an unknown name and RuntimeError when "triton" is forced where it
    cannot run (no Triton, or CPU tensors without the interpreter).
    """
    requested = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if requested is None:
        return "triton" if HAS_TRITON and device.type == "cuda" else auto_cpu
    if requested not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{op}: unknown {source} {requested!r}; expected one of {BACKENDS}")
    if requested == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreter_on():
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors (got {device.type}); on a CPU set "
                "TRITON_INTERPRET=1 before importing the kernels to use Triton's interpreter"
            )
    return requested
