"""The documentation against the code: the key reference in docs/configuration.md is what the schema renders,
every key has a description, the README stays short, its example config validates, and every repository path
the docs cite exists. Pure text checks, no model is built."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from pydantic import BaseModel

from cogft.config import Config
from cogft.config_file import build_config
from cogft.config_reference import with_reference

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300


def leaf_fields(model: type[BaseModel] = Config, prefix: str = "") -> dict:
    """Every leaf key of the schema as the command line writes it (`section.key`, or `output_dir`) -> its field."""
    fields = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            fields.update(leaf_fields(field.annotation, f"{prefix}{name}."))
        else:
            fields[f"{prefix}{name}"] = field
    return fields


def test_every_config_key_has_a_description():
    missing = [key for key, field in leaf_fields().items() if not (field.description or "").strip()]
    assert not missing, f"config keys with no description= in cogft/config.py: {', '.join(missing)}"


def test_the_key_reference_is_what_the_schema_renders():
    page = REPO / "docs" / "configuration.md"
    text = page.read_text()
    assert text == with_reference(text), ("docs/configuration.md differs from the schema's descriptions; "
                                          "run python -m cogft.config_reference")
    listed = set(re.findall(r"^\| `([\w.]+)` \|", text, re.M))
    assert listed == set(leaf_fields()), f"keys not in the reference: {set(leaf_fields()) - listed}"


def test_the_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, more than {README_MAX_LINES}: move reference "
                                       "material to docs/ and link it")


def test_the_readme_example_config_validates():
    blocks = re.findall(r"^```yaml\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S)
    assert blocks, "the README's Configuration overview has no example config"
    for block in blocks:
        build_config(yaml.safe_load(block), source="README.md's example")


def _repo_roots() -> set[str]:
    """Top-level names of the repository (what a cited path must start with to be a repository path)."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        roots = {line.split("/")[0] for line in listed.splitlines() if line}
    except (OSError, subprocess.CalledProcessError):
        roots = {p.name for p in REPO.iterdir()} - {".git", ".venv", "runs", "wandb"}
    return roots | {"docs"}


PATH_TOKEN = re.compile(r"[\w.\-*<>{}$~…]+(?:/[\w.\-*<>{}$~…]*)+")
LINK = re.compile(r"\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"NNN|\.\.\.|…|[<>{}$~]")


def cited_paths(doc: Path, roots: set[str]) -> set[str]:
    """Repository paths a markdown file cites: backquoted or bare paths starting at a top-level name of
    the repository (relative to the repository root), and relative link targets (relative to the file)."""
    text = doc.read_text()
    cited = set()
    for target in LINK.findall(text):
        target = target.split("#")[0]
        if target and not re.match(r"^[a-z][a-z0-9+.-]*:", target):
            cited.add(str((doc.parent / target).resolve().relative_to(REPO)))
    for token in PATH_TOKEN.findall(text):
        token = re.sub(r":\d+$", "", token.rstrip(".,;:")).removeprefix("./")
        if token.split("/")[0] in roots and not PLACEHOLDER.search(token):
            cited.add(token)
    return cited


def test_every_cited_repository_path_exists():
    roots = _repo_roots()
    missing = []
    for doc in DOCS:
        for path in sorted(cited_paths(doc, roots)):
            found = any(REPO.glob(path)) if "*" in path else (REPO / path).exists()
            if not found:
                missing.append(f"{doc.relative_to(REPO)}: {path}")
    assert not missing, "paths cited in the docs that are not in the repository:\n  " + "\n  ".join(missing)
