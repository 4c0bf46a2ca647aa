"""The documentation matches the code: the figures page is the registry's, every relative link and image resolves,
the README's test command is what CI runs, and every README example composes into a valid config."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO

PAGES = sorted([REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md")])

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code spans blanked (a link's text may be code)."""
    return INLINE_CODE.sub("code", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {github_anchor(h) for h in HEADING.findall(FENCE.sub("", page.read_text()))}


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_pages_hold_relative_links_to_check():
    assert {p.name for p in PAGES} >= {"README.md", "figures.md", "verification.md", "python-api.md"}
    assert "docs/mlflow_runs_table.png" in relative_links(REPO / "README.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif not resolved.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: {resolved.name} has no heading #{fragment}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_a_broken_link_or_anchor_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](missing.md) ![img](nope.png)\n\n```\n[in code](skipped.md)\n```\n")
    assert relative_links(page) == ["#top", "missing.md", "nope.png"]
    assert github_anchor("`vllm`: vLLM's engine") == "vllm-vllms-engine"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_figures", REPO / "docs" / "generate_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_figures_page_is_the_one_the_registry_generates():
    generated = load_generator().generate()
    assert (REPO / "docs" / "figures.md").read_text() == generated, (
        "docs/figures.md differs from sweep/measure/figures.py: run python docs/generate_figures.py"
    )


def test_the_figures_page_names_every_figure_with_its_unit_and_direction():
    from sweep.measure.figures import FIGURES

    page = (REPO / "docs" / "figures.md").read_text()
    for f in FIGURES:
        row = next(line for line in page.splitlines() if line.startswith(f"| `{f.name}"))
        assert f"| {f.unit or '-'} | {f.better or '-'} |" in row, row


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def steps(command: str) -> list[str]:
    """A shell command's steps, `-q` dropped, as `.ci/run` writes its pip lines quietly."""
    joined = command.replace("\\\n", " ")
    return [" ".join(w for w in step.split() if w != "-q") for step in re.split(r"&&|\n", joined) if step.strip()]


def test_the_readme_test_command_runs_the_steps_ci_runs():
    ci = [s for line in (REPO / ".ci" / "run").read_text().splitlines() for s in steps(line.split(" #")[0])]
    (test_command,) = [b for b in bash_blocks((REPO / "README.md").read_text()) if "pytest" in b]
    missing = [step for step in steps(test_command) if step not in ci]
    assert not missing, f"the README's test command has steps .ci/run does not run: {missing}"


def readme_examples() -> list[list[str]]:
    """The overrides of each command under the README's 'Ten examples' heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Ten examples", 1)[1].split("\n## ", 1)[0]
    commands = [line.split(" #")[0] for line in bash_blocks(section)[0].splitlines() if line.strip()]
    examples = []
    for command in commands:
        words = shlex.split(command)
        assert words[:3] == ["python", "-m", "sweep"], command
        examples.append([w for w in words[3:] if w != "-m"])
    return examples


def test_the_readme_shows_ten_examples_and_each_composes_into_a_valid_config():
    from sweep.job.compose import compose
    from sweep.job.validate import validate

    examples = readme_examples()
    assert len(examples) == 10
    for overrides in examples:
        # a multirun's grid `key=a,b,c`: its first point stands for the rest
        point = [o.split(",")[0] if "," in o and "(" not in o else o for o in overrides]
        validate(compose(point))


# Built from parts, so that this file does not itself name what it looks for.
NOT_IN_DOCS = {
    "a path outside the repository": r"\.\./shar" + "ed",
    "an issue number": r"\bissues?\s+#?\d|(?<![\w/&?=])#\d+\b",
    "a defect number": r"\bDefe" + r"ct\s+\d",
    "a work log's period": r"\bsess" + "ion",
    "the original project by its old name": r"\bthe\s+se" + r"ed\b",
}


@pytest.mark.parametrize("page", [*PAGES, REPO / "docs" / "generate_figures.py"], ids=lambda p: p.name)
def test_the_docs_name_no_outside_path_issue_or_work_log(page):
    text = page.read_text()
    found = [
        f"{what}: {m.group(0)!r}" for what, pattern in NOT_IN_DOCS.items() for m in re.finditer(pattern, text, re.I)
    ]
    assert not found, f"{page.relative_to(REPO)}: " + "; ".join(found)
