"""The registered model families, and the lookups by pipeline configs, by short name and by hub id.

CogVideoX is registered here; another family registers itself with `register_family` (a plugin module named in
`COGFT_FAMILIES`, comma-separated, is imported first, so a launched process sees it too).
"""

from __future__ import annotations

import functools
import importlib
import os

from ..config import ConfigError
from .cogvideox import FAMILY as COGVIDEOX
from .family import ModelFamily, PipelineConfigs, UnsupportedModelError, Variant, VariantSpec

_FAMILIES: list[ModelFamily] = [COGVIDEOX]


def register_family(family: ModelFamily) -> None:
    """Make `family`'s variants known to every lookup (idempotent: a family of the same name is replaced)."""
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name] + [family]


@functools.cache
def _load_plugins(names: str) -> None:
    for name in filter(None, (n.strip() for n in names.split(","))):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"COGFT_FAMILIES: cannot import {name} ({error}); name importable modules that "
                              "call cogft.models.registry.register_family") from None


def families() -> tuple[ModelFamily, ...]:
    _load_plugins(os.environ.get("COGFT_FAMILIES", ""))
    return tuple(_FAMILIES)


def all_specs() -> tuple[VariantSpec, ...]:
    return tuple(spec for family in families() for spec in family.specs)


def spec_for(configs: PipelineConfigs, where: str) -> VariantSpec:
    """The one variant whose identity matches a pipeline's own configs; refused by name otherwise (`where` names
    the pipeline)."""
    found = [spec for spec in all_specs() if spec.matches(configs)]
    if len(found) == 1:
        return found[0]
    supported = ", ".join(f"{s.name} ({s.hub_id})" for s in all_specs())
    said = next((text for text in (f.explain(configs) for f in families()) if text), "")
    raise UnsupportedModelError(f"model.path {where}: {said or 'no registered variant matches its configs'}. "
                                f"Supported: {supported}")


def spec_named(short: str, scheme: str) -> VariantSpec:
    """The spec behind `tiny://SHORT` / `random://SHORT`."""
    for spec in all_specs():
        if spec.short == short:
            return spec
    offered = ", ".join(f"{scheme}{s.short}" for s in all_specs())
    raise ConfigError(f"model.path {scheme}{short}: not offered; choose one of {offered}")


def reference_for(hub_id: str) -> PipelineConfigs | None:
    """The built-in configs of a known hub id (the spec's owner, or THUDM's new name zai-org; any case), else None."""
    owner, _, name = hub_id.lower().partition("/")
    for spec in all_specs():
        spec_owner, _, spec_name = spec.hub_id.lower().partition("/")
        if name == spec_name and owner in (spec_owner, "zai-org" if spec_owner == "thudm" else spec_owner):
            return spec.reference
    return None


def default_variant() -> Variant:
    """The variant whose rules a dataset checked without a model is held to (the first registered: CogVideoX-2B)."""
    spec = families()[0].specs[0]
    return spec.bind(spec.tiny)
