"""The reference of every config key in docs/configuration.md, rendered from the schema (`config.py`): each key's
type and bounds, default and description are written once, there, and tests/test_docs.py fails when the page
differs from what the schema renders.

After changing a key: `python -m cogft.config_reference [PATH]` rewrites the part of PATH (default
docs/configuration.md) between its two markers; the prose around them is hand-written.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import Config

DOC = Path("docs/configuration.md")
BEGIN = "<!-- BEGIN KEYS: made by `python -m cogft.config_reference` from the descriptions in cogft/config.py -->"
END = "<!-- END KEYS -->"
_NAMES = {bool: "true or false", int: "integer", float: "number", str: "string"}


def _section(annotation: object) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _listed_section(annotation: object) -> type[BaseModel] | None:
    """The section a list key holds entries of (`data.sets`), if any."""
    for member in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(member) is list and _section(typing.get_args(member)[0]):
            return typing.get_args(member)[0]
    return None


def _bounds(metadata: list) -> str:
    """A number's bounds as written in maths: ≥ 1, > 0, in [0, 1], in (0, 1)."""
    low = next((("[", m.ge) for m in metadata if isinstance(m, at.Ge)), None) or next(
        (("(", m.gt) for m in metadata if isinstance(m, at.Gt)), None)
    high = next(((m.le, "]") for m in metadata if isinstance(m, at.Le)), None) or next(
        ((m.lt, ")") for m in metadata if isinstance(m, at.Lt)), None)
    if low and high:
        return f"in {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        return f"{'≥' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'≤' if high[1] == ']' else '<'} {high[0]}"
    return ""


def type_text(annotation: object, metadata: list) -> str:
    """What a key takes, in YAML's words: `integer ≥ 1, or null`, `` `lora`, `sft` ``, `list of strings`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0], [*metadata, *args[1:]])
    if origin is typing.Literal:
        return ", ".join(f"`{value}`" for value in args)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if not (a is int and float in args)]  # int | float: a number
        return ", or ".join(type_text(member, metadata) for member in members)
    if annotation is type(None):
        return "null"
    min_length = next((m.min_length for m in metadata if isinstance(m, at.MinLen)), 0)
    if origin is tuple:
        return f"a pair [{type_text(args[0], [])}, {type_text(args[1], [])}]"
    if origin is list:
        entries = "entries (their keys below)" if _section(args[0]) else f"{type_text(args[0], [])}s"
        return f"list of {entries}" + (f", at least {min_length}" if min_length else "")
    if origin is dict:
        return "mapping of names to values"
    name = _NAMES[annotation]
    if annotation is str:
        return f"{name}, not empty" if min_length else name
    bounds = _bounds(metadata) if annotation in (int, float) else ""
    return f"{name} {bounds}" if bounds else name


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(map(str, value))}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    if isinstance(value, float):  # as YAML reads it back: 1.0, 0.0001, 1e-8
        text = f"{value:g}".replace("e-0", "e-")
        return text if any(c in text for c in ".e") else f"{text}.0"
    return str(value) if value != "" else '""'


def _row(key: str, field: FieldInfo) -> str:
    cells = [f"`{key}`", type_text(field.annotation, field.metadata), default_text(field), field.description or ""]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _table(rows: list[str]) -> list[str]:
    return ["| key | takes | default | what it does |", "|---|---|---|---|", *rows]


def render(schema: type[BaseModel] = Config) -> str:
    """The reference: per section a heading, the section's docstring and a table of its keys."""
    lines, top_level = [], []
    for name, field in schema.model_fields.items():
        section = _section(field.annotation)
        if section is None:
            top_level.append(_row(name, field))
            continue
        keys = []
        for key, f in section.model_fields.items():
            keys.append(_row(f"{name}.{key}", f))
            entry = _listed_section(f.annotation)  # a list of entries: each entry's keys as `data.sets[].path`
            keys += [_row(f"{name}.{key}[].{sub}", g) for sub, g in (entry.model_fields if entry else {}).items()]
        lines += [f"### `{name}`", "", " ".join(section.__doc__.split()), "", *_table(keys), ""]
    lines += ["### Top level", "", *_table(top_level)]
    return "\n".join(lines)


def with_reference(text: str) -> str:
    """`text` with the part between BEGIN and END replaced by the rendered reference."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"the page has no {BEGIN!r} ... {END!r} markers to put the key reference between")
    return f"{head}{BEGIN}\n\n{render()}\n\n{END}{tail}"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DOC
    try:
        text = path.read_text()
        path.write_text(with_reference(text))
    except (OSError, ValueError) as error:
        print(f"{path}: {error}", file=sys.stderr)
        return 2
    print(f"wrote the key reference into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
