"""The documentation cannot drift from the code: the generated option tables match it, the
site builds with --strict (broken links, anchors and API references fail), and every
Python block in README.md, docs/ and the kernels' README runs."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from motg_fast.kernels import MixtureSpec, mixture_step
from motg_fast.testing import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "motg_fast" / "kernels" / "README.md"]
PAGES += sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"(<!-- tested: (\w+) -->\n)?```python\n(.*?)```", re.DOTALL)


def _blocks(page: Path) -> list[tuple[str | None, str]]:
    return [(m.group(2), m.group(3)) for m in BLOCK.finditer(page.read_text())]


def _render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts/render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_page_is_generated_from_the_config_parts():
    render = _render_docs()
    assert render.OPTIONS_PAGE.read_text() == render.options_page(), (
        "docs/options.md differs from the code: run python scripts/render_docs.py"
    )


def test_options_page_lists_every_flag_with_its_default():
    from motg_fast.config import PARTS

    text = (ROOT / "docs" / "options.md").read_text()
    for cls in PARTS.values():
        for f in cls.__dataclass_fields__.values():
            assert f"| `--{f.name}` |" in text


@pytest.mark.subprocess
def test_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (the docs extra)")
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    home = (tmp_path / "site" / "index.html").read_text()
    for page in ("training", "options", "methods", "api/kernels"):
        assert f'href="{page}/' in home  # the navigation reaches every section


def _context() -> dict:
    """Names the doc fragments take from the surrounding code: a tiny model, a prompt, its
    logits, and stored actions `[B,T,k]` (with the next position's as `next_*`)."""
    torch.manual_seed(0)
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    embedding = model.get_input_embeddings().weight
    B, P, T = 2, 3, 4
    prompt_ids = torch.randint(embedding.shape[0], (B, P))
    embeds = embedding[prompt_ids].detach()
    gen = torch.Generator().manual_seed(0)
    spec = MixtureSpec(k=2, selection="sample")
    steps = [
        mixture_step(torch.randn(B, embedding.shape[0]), embedding.detach(), spec, generator=gen)
        for _ in range(T + 1)
    ]

    def stacked(name, positions):
        return torch.stack([getattr(steps[t], name) for t in positions], dim=1)

    now, after = range(T), range(1, T + 1)
    stored = {"ids": "ids", "weights": "weights", "mask": "mask", "weight_logits": "weight_logits"}
    context = {name: stacked(attr, now) for name, attr in stored.items()}
    context.update({f"next_{name}": stacked(attr, after) for name, attr in stored.items()})
    context["next_token_slot"] = stacked("token_slot", after)
    stored_list: list = []
    context.update(
        torch=torch,
        model=model,
        tokenizer=tokenizer,
        embedding=embedding,
        spec=spec,
        prompt_ids=prompt_ids,
        embeds=embeds,
        cache=None,
        gen=gen,
        logits=model(inputs_embeds=embeds).logits[:, -1].detach(),
        advantages=torch.randn(B),
        store=lambda *action: stored_list.append(action),
    )
    return context


def _page_cases():
    cases = []
    for page in PAGES:
        blocks = [code for name, code in _blocks(page) if name is None]
        if not blocks:
            continue
        slow = any("load_model(" in code for code in blocks)
        marks = [pytest.mark.slow] if slow else []
        cases.append(pytest.param(page, blocks, marks=marks, id=str(page.relative_to(ROOT))))
    return cases


@pytest.mark.parametrize(("page", "blocks"), _page_cases())
def test_python_blocks_run(page, blocks):
    """Each page's blocks run in order in one namespace (a later block may use an earlier
    one's names), fragments taking their free names from :func:`_context`."""
    namespace = _context()
    for index, code in enumerate(blocks):
        exec(compile(code, f"{page.name}[python block {index}]", "exec"), namespace)


def test_tagged_blocks_have_their_test():
    tests = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    for page in PAGES:
        for name, _ in _blocks(page):
            if name is not None:
                assert f'docs_snippet("{name}")' in tests, f"{page.name}: {name} is untested"
