"""The README and docs say true things: links resolve, command lines parse, Python examples import and run (on tiny
models, with their paths and sizes made tiny), and the Layout names every room of the package."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench").glob("*.md"))]


def blocks(page: Path, language: str) -> list[str]:
    """The fenced code blocks of ``page`` in ``language`` (``""``: the blocks that name none)."""
    fenced = re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), re.S | re.M)
    return [code for lang, code in fenced if lang == language]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    found: set[str] = set()
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = sum(1 for a in found if a == slug or re.fullmatch(rf"{re.escape(slug)}-\d+", a))
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name} links to {target}: no such heading"


def parse(argv: list[str]) -> str:
    """Parse a command line with the real CLI without running it; the command path (click errors raise)."""
    import typer.main

    from lmcompress.cli import app

    command = typer.main.get_command(app)
    ctx = command.make_context("lmcompress", list(argv))
    while hasattr(command, "resolve_command"):
        name, command, rest = command.resolve_command(ctx, [*getattr(ctx, "_protected_args", []), *ctx.args])
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx.command_path


@pytest.mark.parametrize("name", ["README.md", "docs/cli.md"])
def test_command_examples_parse(name):
    lines = [
        re.sub(r"\s+#.*$", "", line).strip()
        for block in blocks(ROOT / name, "bash")
        for line in block.replace("\\\n", " ").splitlines()
    ]
    examples = [line for line in lines if line.startswith("lmcompress ")]
    assert examples
    for line in examples:
        parse(shlex.split(line)[1:])  # an unknown option, a missing argument or a bad value raises here
    with pytest.raises(Exception, match="No such option"):
        parse(["prune", "x", "-o", "y", "--no-such-option"])


def test_readme_has_one_example_per_verb():
    from lmcompress.cli import VERBS

    examples = [line.split()[:2] for block in blocks(ROOT / "README.md", "bash") for line in block.splitlines()]
    assert set(VERBS) <= {words[1] for words in examples if len(words) == 2 and words[0] == "lmcompress"}


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in p.read_text()], ids=lambda p: p.name)
def test_python_examples_import(page):
    for block in blocks(page, "python"):
        for line in block.splitlines():
            if re.match(r"(from \S+ import |import )", line):
                exec(line, {})  # e.g. `from lmcompress.factorize import ...` named a module that does not exist


TINY = {
    '"./my-llama"': "LLAMA",
    '"./my-mixtral"': "MIXTRAL",
    "nsamples=128, seqlen=2048": "nsamples=4, seqlen=64",
}


def test_api_examples_run_on_tiny_models(tmp_path, monkeypatch, tiny_folder, calib_text, eval_text, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib.txt").write_text(calib_text)
    (tmp_path / "test.txt").write_text(eval_text)
    code = [*blocks(ROOT / "README.md", "python"), blocks(ROOT / "docs" / "api.md", "python")[0]]
    for i, block in enumerate(code):
        for old, new in TINY.items():
            block = block.replace(old, new)
        names = {"LLAMA": str(tiny_folder("llama")), "MIXTRAL": str(tiny_folder("mixtral"))}
        exec(compile(block, f"example {i}", "exec"), names)
        assert (tmp_path / "out" / "lmcompress.json").is_file()
        for out in tmp_path.glob("out*"):
            shutil.rmtree(out)
    torch.manual_seed(0)
    weight, inputs = torch.randn(8, 16), torch.randn(64, 16)
    tensors = {"W": weight, "H": inputs.T @ inputs, "input_sq_norms": (inputs**2).sum(0)}
    exec(blocks(ROOT / "docs" / "api.md", "python")[1], tensors)
    assert tensors["mask"].shape == weight.shape and tensors["result"].weight.shape == weight.shape


def test_readme_layout_names_every_room():
    layout = next(b for b in blocks(ROOT / "README.md", "") if "lmcompress/algorithms/" in b)
    package = ROOT / "lmcompress"
    rooms = [p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    modules = [p.stem for p in package.glob("*.py") if not p.stem.startswith("__")]
    missing = [r for r in rooms if f"lmcompress/{r}/" not in layout] + [m for m in modules if f"{m}.py" not in layout]
    assert not missing, f"README.md's Layout does not name {missing}"
    from test_layering import LAYERS  # the Layout lists the rooms bottom up, as the layer order declares them

    def line(name: str) -> int:
        return next(i for i, text in enumerate(layout.splitlines()) if re.match(rf"lmcompress/{name}(/|\.py)", text))

    order = [line(name) for layer in LAYERS for name in layer if name and name != "__main__"]
    assert order == sorted(order), "README.md's Layout lists the rooms out of tests/test_layering.py's order"


def test_ci_runs_the_readme_installs_and_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [
        part.strip()
        for block in blocks(ROOT / "README.md", "bash")
        for line in block.splitlines()
        for part in line.split("&&")
        if part.strip().startswith(("pip install", "python -m pytest"))
    ]
    assert len(steps) >= 3  # the demo's install, the test install, the test command
    for step in steps:
        assert ("python -m " + step if step.startswith("pip ") else step) in ci, step


def test_readme_stays_a_map():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 160  # reference material goes to docs/
