"""The registered variants, and the lookups by pipeline configs, by short name and by hub id."""

from __future__ import annotations

from ..config import ConfigError
from .cogvideox import COGVIDEOX_1_5_5B, COGVIDEOX_1_5_5B_I2V, COGVIDEOX_2B, COGVIDEOX_5B, COGVIDEOX_5B_I2V
from .spec import PipelineConfigs, VariantSpec, identify

SPECS: tuple[VariantSpec, ...] = (COGVIDEOX_2B, COGVIDEOX_5B, COGVIDEOX_5B_I2V, COGVIDEOX_1_5_5B, COGVIDEOX_1_5_5B_I2V)


def spec_for(configs: PipelineConfigs, where: str) -> VariantSpec:
    """The variant of a pipeline, from its own configs; `where` names it in the error."""
    return identify(configs, SPECS, where)


def spec_named(short: str, scheme: str) -> VariantSpec:
    """The spec behind `tiny://SHORT` / `random://SHORT`."""
    for spec in SPECS:
        if spec.short == short:
            return spec
    offered = ", ".join(f"{scheme}{s.short}" for s in SPECS)
    raise ConfigError(f"model.path {scheme}{short}: not offered; choose one of {offered}")


def reference_for(hub_id: str) -> PipelineConfigs | None:
    """The built-in configs of a known hub id (THUDM/ or zai-org/, any case), else None."""
    owner, _, name = hub_id.lower().partition("/")
    if owner not in ("thudm", "zai-org"):
        return None
    return next((s.reference for s in SPECS if s.hub_id.split("/")[-1].lower() == name), None)
