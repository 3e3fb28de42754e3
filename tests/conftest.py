"""Shared fixtures: offline hubs, a per-session COGFT_HOME with the tiny models, configs in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session", autouse=True)
def cogft_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("cogft_home")
    os.environ["COGFT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One latent/prompt cache for the session: content-hashed, so tests can share it safely."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_config(tmp_path, shared_cache):
    """The tiny-lora config, pointed at tmp dirs, with `section.key=value` overrides."""
    from cogft.config import load_config

    def build(*overrides: str, base: str = "tiny-lora.yaml", out: str = "run"):
        defaults = [
            f"data.path={REPO / 'data'}",
            f"data.cache_dir={shared_cache}",
            f"output_dir={tmp_path / out}",
            "tracking.report_to=none",
        ]
        return load_config(REPO / "configs" / base, [*defaults, *overrides])

    return build
