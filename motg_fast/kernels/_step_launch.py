"""The launchers of the Triton rollout step (`mixture_step.py` holds the math, the reference
and `mixture_step_triton`): the launch plan (constexpr codes and scalars), the split
heuristic and its tunables, and the scan (+ merge) launch of `_step_scan.py`'s kernels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._launch import next_pow2
from ._philox import StepNoise
from ._step_embed import TOKEN_ARGMAX, TOKEN_FIRST
from ._step_merge import step_merge_kernel, step_split_kernel
from ._step_scan import SELECTION_CODES, WEIGHTING_CODES, step_row_kernel
from .mixture_math import inverse_temperature
from .spec import RANDOM_SELECTIONS, MixtureSpec

# Noise sources of a stream (the kernels' constexprs SEL_NOISE, W_NOISE, TOKEN; `_philox.py`).
# The selection and weighting codes are `_step_scan.py`'s, the token codes `_step_embed.py`'s.
NOISE_NONE, NOISE_GIVEN, NOISE_PHILOX = 0, 1, 2  # host-side values of `_philox.py`'s codes


# Tunables of the Triton path. They can only be measured on a GPU; see README.md beside this file.
BLOCK_V = 1024  # vocabulary tile of a scan program
SCAN_WARPS = 4  # warps of the scan / merge programs
PROGRAMS_PER_SM = 2  # split target when the batch alone cannot fill the GPU
MIN_SPLIT_COLUMNS = 2048  # a split program streams at least this many columns
MERGE_TILE = 2048  # partial keys a merge program loads at once
TRITON_MAX_K = 64  # larger k: the reference (auto) or a clear error (forced Triton)
IID_TILE = 4096  # K_PAD · BLOCK_V noise elements an `iid` scan tile holds (default block_v)


def split_count(batch: int, vocab: int, num_sms: int) -> int:
    """Programs per logits row for a batch of `batch` rows on a GPU with `num_sms` SMs.

    1 (one program per row, no merge stage) once the batch alone gives every SM a row;
    otherwise enough splits for about `PROGRAMS_PER_SM` programs per SM, but never fewer
    than `MIN_SPLIT_COLUMNS` columns per program (the partial top-k, the partial state and
    the merge then cost little next to the columns streamed).
    """
    if batch >= num_sms:
        return 1
    wanted = -(-PROGRAMS_PER_SM * num_sms // batch)
    return max(1, min(wanted, vocab // MIN_SPLIT_COLUMNS))


def split_plan(vocab: int, splits: int, block_v: int) -> tuple[int, int]:
    """`(splits, chunk)`: chunks of whole `block_v` tiles covering the vocabulary."""
    tiles = -(-vocab // block_v)
    chunk = -(-tiles // max(1, min(splits, tiles))) * block_v
    return -(-vocab // chunk), chunk


class LaunchPlan(NamedTuple):
    """Per-call constants of the Triton step: constexpr codes and scalar arguments."""

    codes: dict  # constexpr switches shared by the scan/select kernels
    scalars: dict  # 1/τ, top_p, log min_p, λ, the noise clamp as the kernels name them
    token: int  # the embed kernel's TOKEN code (representative slot and its noise source)
    k_pad: int


def _noise_source(used: bool, given: torch.Tensor | None) -> int:
    if not used:
        return NOISE_NONE
    return NOISE_GIVEN if given is not None else NOISE_PHILOX


def make_plan(spec: MixtureSpec, noise: StepNoise) -> LaunchPlan:
    """Kernel codes and scalars of one step."""
    use_min_p = bool(spec.min_p)
    clamp = spec.gumbel_clamp or (-math.inf, math.inf)
    codes = dict(
        SELECTION=SELECTION_CODES[spec.selection],
        SEL_NOISE=_noise_source(spec.selection in RANDOM_SELECTIONS, noise.selection),
        W_NOISE=_noise_source(spec.weighting == "gumbel", noise.weight),
        WEIGHTING=WEIGHTING_CODES[spec.weighting],
        USE_TOP_P=spec.top_p is not None,
        TOP_P_SLOTS=spec.top_p_mass == "slots",
        USE_MIN_P=use_min_p,
        K_PAD=next_pow2(spec.k),
    )
    scalars = dict(
        inv_temperature=inverse_temperature(spec.temperature),
        top_p=float(spec.top_p) if spec.top_p is not None else 1.0,
        log_min_p=math.log(spec.min_p) if use_min_p else 0.0,
        gumbel_temperature=float(spec.gumbel_temperature),
        gumbel_lo=clamp[0],
        gumbel_hi=clamp[1],
    )
    token = {"argmax": TOKEN_ARGMAX, "first": TOKEN_FIRST}.get(spec.representative)
    if token is None:
        token = _noise_source(True, noise.token)
    return LaunchPlan(codes=codes, scalars=scalars, token=token, k_pad=codes["K_PAD"])


def float_noise(noise: StepNoise) -> StepNoise:
    """The given noise streams as contiguous float32 (the kernels load float32)."""
    return StepNoise(*(None if n is None else n.float().contiguous() for n in noise))


def _select_outputs(batch: int, k: int, device: torch.device) -> dict:
    """Empty outputs of the select stage, named as the kernels name them."""
    on = dict(device=device)
    return dict(
        ids_ptr=torch.empty(batch, k, dtype=torch.int64, **on),
        weights_ptr=torch.empty(batch, k, dtype=torch.float32, **on),
        w_logits_ptr=torch.empty(batch, k, dtype=torch.float32, **on),
        mask_ptr=torch.empty(batch, k, dtype=torch.bool, **on),
        logprobs_ptr=torch.empty(batch, k, dtype=torch.float32, **on),
        lse_ptr=torch.empty(batch, dtype=torch.float32, **on),
        entropy_ptr=torch.empty(batch, dtype=torch.float32, **on),
    )


def _selection_noise(noise: StepNoise, logits: torch.Tensor) -> dict:
    """The selection-noise arguments: its tensor (`[B,V]`, or `[B,k,V]` for `iid`;
    contiguous float32) and strides, or a never-read placeholder."""
    sel_noise = noise.selection
    if sel_noise is None:
        return dict(sel_noise_ptr=logits, stride_noise_row=0, stride_noise_draw=0)
    draw_stride = sel_noise.stride(1) if sel_noise.dim() == 3 else 0
    return dict(
        sel_noise_ptr=sel_noise,
        stride_noise_row=sel_noise.stride(0),
        stride_noise_draw=draw_stride,
    )


def launch_select(logits, k, plan, seed, noise, splits, block_v):
    """Scan (+ merge) kernels: `(ids, weights, weight logits, mask, logprobs, lse, entropy)`."""
    batch, vocab = logits.shape
    outs = _select_outputs(batch, k, logits.device)
    seed = seed if seed is not None else logits  # placeholders are never read
    weight_noise = noise.weight if noise.weight is not None else logits
    row = dict(logits_ptr=logits, stride_row=logits.stride(0), stride_col=logits.stride(1))
    scan = dict(
        k=k,
        inv_temperature=plan.scalars["inv_temperature"],
        K_PAD=plan.k_pad,
        SELECTION=plan.codes["SELECTION"],
        num_warps=SCAN_WARPS,
        enable_fp_fusion=False,  # z·(1/τ) + g rounds twice, as the reference does
    )
    select = dict(
        top_p=plan.scalars["top_p"],
        log_min_p=plan.scalars["log_min_p"],
        gumbel_temperature=plan.scalars["gumbel_temperature"],
        gumbel_lo=plan.scalars["gumbel_lo"],
        gumbel_hi=plan.scalars["gumbel_hi"],
        WEIGHTING=plan.codes["WEIGHTING"],
        USE_TOP_P=plan.codes["USE_TOP_P"],
        TOP_P_SLOTS=plan.codes["TOP_P_SLOTS"],
        USE_MIN_P=plan.codes["USE_MIN_P"],
        W_NOISE=plan.codes["W_NOISE"],
        weight_noise_ptr=weight_noise,
        seed_ptr=seed,
        **outs,
    )
    sample = dict(
        BLOCK_V=block_v, SEL_NOISE=plan.codes["SEL_NOISE"], **_selection_noise(noise, logits)
    )
    splits, chunk = split_plan(vocab, splits, block_v)
    if splits == 1:
        step_row_kernel[(batch,)](V=vocab, **row, **scan, **select, **sample)
        return tuple(outs.values())
    on = dict(dtype=torch.int64, device=logits.device)
    part_keys = torch.empty(batch, splits, plan.k_pad, **on)
    sample_topk = plan.codes["SELECTION"] == SELECTION_CODES["sample_topk"]
    part_sampled = torch.empty(batch, splits, **on) if sample_topk else part_keys
    part_stats = torch.empty(batch, splits, 3, dtype=torch.float32, device=logits.device)
    parts = dict(
        part_keys_ptr=part_keys,
        part_sampled_ptr=part_sampled,
        part_stats_ptr=part_stats,
        n_split=splits,
    )
    step_split_kernel[(batch, splits)](
        V=vocab, chunk=chunk, seed_ptr=seed, **row, **parts, **scan, **sample
    )
    split_block = min(next_pow2(splits), max(1, MERGE_TILE // plan.k_pad))
    step_merge_kernel[(batch,)](SPLIT_BLOCK=split_block, **row, **parts, **scan, **select)
    return tuple(outs.values())


def check_tuning(splits: int | None, block_v: int | None, k_pad: int, iid: bool) -> int:
    """The scan tile: `block_v`, or by default `BLOCK_V` (`iid`: at most `IID_TILE / K_PAD`
    columns, its noise tile being `[K_PAD, block_v]`)."""
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"vocab_splits must be an integer >= 1, got {splits!r}")
    if block_v is None:
        block_v = max(16, min(BLOCK_V, IID_TILE // k_pad)) if iid else BLOCK_V
    if not isinstance(block_v, int) or block_v < max(16, k_pad) or block_v & (block_v - 1):
        raise ValueError(
            f"block_v must be a power of two >= max(16, next_pow2(k)={k_pad}), got {block_v!r}"
        )
    return block_v
