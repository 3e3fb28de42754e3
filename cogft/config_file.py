"""The config as a file: YAML in (a key written twice refused), `section.key=value` overrides merged over it,
validated against the schema in `config.py` with one line per mistake, and the resolved config written back.

Every mistake is reported before any model is loaded, naming the file, the key, the bad value and what is
allowed, so a typo costs a second instead of a queued GPU job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from .config import Config, ConfigError

SHOWN_VALUE_CHARS = 200  # a longer bad value is cut short in its message (a whole prompt list given as one string)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`section.key=value` strings → a nested dict; values are YAML-typed (3 → int, [a, b] → list)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.max_steps=100")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _problem(item: dict) -> str:
    """pydantic's message for one mistake, without the "Value error, " it puts before a validator's own words."""
    error = item.get("ctx", {}).get("error")
    return str(error) if item["type"] == "value_error" and error is not None else item["msg"]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else f"{text[:SHOWN_VALUE_CHARS]}... ({len(text)} characters)"


def _listed(annotation: Any) -> Any:
    """The section a list of sections holds (`data.sets`: DataSetConfig), else the annotation itself."""
    for arg in (a for union in (annotation, *get_args(annotation)) for a in get_args(union) or (union,)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid config"]
    for item in error.errors():
        # a list's entry as the docs write it: data.sets[1].path
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".") or "(top level)"
        if item["type"] == "extra_forbidden":
            section = Config
            for part in item["loc"][:-1]:
                field = section.model_fields.get(str(part)) if hasattr(section, "model_fields") else None
                section = _listed(field.annotation) if field else section
            allowed = ", ".join(sorted(getattr(section, "model_fields", {})))
            lines.append(f"  {key}: unknown key; allowed here: {allowed}")
        elif item["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif item["type"] == "value_error" and isinstance(item["input"], dict):
            # a check across keys: its words name them and their values; the section itself would be a wall of text
            lines.append(f"  {_problem(item)}" if not item["loc"] else f"  {key}: {_problem(item)}")
        else:
            lines.append(f"  {key}: {_problem(item)} (got {_shown(item['input'])})")
    return "\n".join(lines)


def build_config(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key written twice in one mapping (PyYAML keeps the last one without a word)."""


def _mapping_without_repeats(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        key, line = loader.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
        if key in first_line:
            raise ConfigError(f"line {line}: {key!r} is written a second time (first on line {first_line[key]}); "
                              "merge the two, the second would silently replace the first")
        first_line[key] = line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides, validate. Relative data/model/output paths stay as written."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} {'is a folder, not a YAML file' if path.is_dir() else 'not found'}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train:, ...)")
    raw = _merge(raw, parse_overrides(overrides or []))
    return build_config(raw, source=str(path))


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config (file, overrides and defaults) as YAML that `load_config` reads back."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
