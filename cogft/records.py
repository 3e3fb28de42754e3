"""Reading back the small files a run writes for itself (best.json, export.json, checkpoint markers, its
config.yaml): a file cut by a kill, emptied by a full disk or edited by hand is named with what is wrong and
what to do, never a traceback. Callers for whom a record is optional log the error and go on without it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError

_KINDS = {int: "a whole number", float: "a finite number", str: "text", dict: "an object", list: "a list"}


class DamagedRecordError(ConfigError):
    """A file cogft wrote and reads back is not what it wrote (the CLI reports it like a config error)."""


def damaged(path: Path, why: str, fix: str) -> DamagedRecordError:
    """The error naming `path`, what is wrong and `fix` (empty: the caller says what to do)."""
    return DamagedRecordError(f"{path} is damaged ({why})" + (f"; {fix}" if fix else ""))


def _text(path: Path, fix: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise damaged(path, f"not UTF-8 text: byte {error.start}", fix) from None
    except OSError as error:
        raise damaged(path, f"unreadable: {error.strerror or error}", fix) from None


def read_json(path: Path, fix: str, **fields: type) -> Any:
    """The JSON value in `path`; with `fields` it must be an object holding each field with its type (an int is
    not a bool; a float is finite), e.g. `read_json(p, fix, step=int)`."""
    text = _text(path, fix)
    if not text.strip():
        raise damaged(path, "empty", fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise damaged(path, f"not JSON, cut short or overwritten: {error.msg} (line {error.lineno}, column "
                            f"{error.colno})", fix) from None
    except RecursionError:
        raise damaged(path, "not JSON cogft writes: nested too deep", fix) from None
    return has_fields(value, path, fix, **fields) if fields else value


def read_yaml(path: Path, fix: str) -> dict:
    """The mapping a YAML file written by cogft holds."""
    text = _text(path, fix)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise damaged(path, f"not YAML: {str(error).splitlines()[0]}", fix) from None
    if not isinstance(value, dict):
        raise damaged(path, f"{_kind_of(value)} where a mapping belongs", fix)
    return value


def has_fields(value: Any, path: Path, fix: str, **fields: type) -> dict:
    """`value` if it is an object with each of `fields` of its type, else the error naming the first that is not."""
    if not isinstance(value, dict):
        wanted = f"an object with {', '.join(fields)}" if fields else "an object"
        raise damaged(path, f"{_kind_of(value)} where {wanted} belongs", fix)
    for key, kind in fields.items():
        if key not in value:
            raise damaged(path, f"no {key!r}", fix)
        if not is_kind(value[key], kind):
            shown = repr(value[key])
            raise damaged(path, f"{key!r} is {shown[:40] + '...' if len(shown) > 40 else shown}, not "
                                f"{_KINDS.get(kind, kind.__name__)}", fix)
    return value


def is_kind(value: Any, kind: type) -> bool:
    """JSON's types as a record means them: bool is no number, a float is finite, an int counts as a float."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _kind_of(value: Any) -> str:
    return "nothing" if value is None else f"a JSON {type(value).__name__}"
