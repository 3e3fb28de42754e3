"""Everything cogft knows of CogVideoX: its variants, configurations, objective, image conditioning and
attention processor. `FAMILY` is what the registry (`models/registry.py`) holds."""

from .variants import FAMILY

__all__ = ["FAMILY"]
