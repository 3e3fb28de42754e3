"""The documentation against the code: every config key is in the README's key table, and every
repository path the docs cite exists. Pure text checks, no model is built."""

from __future__ import annotations

import re
import subprocess
import typing
from pathlib import Path

from pydantic import BaseModel

from cogft.config import Config

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _section_model(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds (also inside Optional[...] / unions), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def schema_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every leaf key of the schema as the command line writes it: `section.key`, or `output_dir`."""
    keys = []
    for name, field in model.model_fields.items():
        section = _section_model(field.annotation)
        if section is not None:
            keys.extend(schema_keys(section, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def readme_table_keys(text: str) -> set[str]:
    """Backquoted keys in the first cell of the table rows of the README's `## Configuration` section."""
    section = re.search(r"^## Configuration\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "README.md has no '## Configuration' section"
    keys = set()
    for line in section.group(1).splitlines():
        if line.lstrip().startswith("|"):
            first_cell = line.strip().strip("|").split("|")[0]
            keys.update(re.findall(r"`([A-Za-z_][\w.]*)`", first_cell))
    return keys


def test_every_config_key_is_in_the_readme_key_table():
    table = readme_table_keys((REPO / "README.md").read_text())
    assert table, "no keys found in the README's Configuration table"
    missing = [key for key in schema_keys() if key not in table]
    assert not missing, f"config keys missing from the README's key table (## Configuration): {', '.join(missing)}"


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
