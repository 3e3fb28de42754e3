"""Refused before any work, by name: W&B online with no login; `--from` weights that are damaged."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogft.cli import main

REPO = Path(__file__).resolve().parent.parent
WANDB_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DISABLED", "WANDB_CONFIG_DIR",
             "WANDB_BASE_URL", "NETRC")
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch) -> Path:
    """A HOME with no netrc and no W&B settings, and none of W&B's variables (conftest sets WANDB_MODE)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    return home


def test_wandb_online_without_a_login_is_refused_before_prepare(no_wandb_login, tmp_path, capsys):
    cache = tmp_path / "cache"
    code = main(["train", "--config", str(REPO / "configs" / "tiny-lora.yaml"), "tracking.wandb_mode=null",
                 "tracking.report_to=wandb", f"output_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                 f"data.path={REPO / 'data'}"])
    error = capsys.readouterr().err
    assert code == 2 and "cogft train: error: tracking.report_to=wandb" in error and "Traceback" not in error
    for fix in ("`wandb login`", "WANDB_API_KEY", "tracking.wandb_mode=offline", "tracking.report_to=none"):
        assert fix in error
    assert not cache.exists()  # refused before prepare


@pytest.mark.parametrize("setting", ["WANDB_MODE=offline", "WANDB_MODE=disabled", "WANDB_DISABLED=true",
                                     "tracking.wandb_mode=offline", "WANDB_API_KEY", "netrc", "wandb offline"])
def test_wandb_with_a_login_or_needing_none_passes(setting, no_wandb_login, make_config, monkeypatch):
    from cogft.tracking import check_wandb_login

    overrides = ["tracking.report_to=wandb", "tracking.wandb_mode=null"]
    key = "0123456789abcdef0123456789abcdef01234567"
    if setting == "tracking.wandb_mode=offline":
        overrides.append(setting)
    elif setting.startswith("WANDB_"):
        name, _, value = setting.partition("=")
        monkeypatch.setenv(name, value or key)
    elif setting == "netrc":  # what `wandb login` writes
        (no_wandb_login / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {key}\n")
    else:  # `wandb offline` writes the mode to the settings file
        (no_wandb_login / ".config" / "wandb").mkdir(parents=True)
        (no_wandb_login / ".config" / "wandb" / "settings").write_text("[default]\nmode = offline\n")
    check_wandb_login(make_config(*overrides))


def test_wandb_disabled_turns_wandb_off(no_wandb_login, make_config, monkeypatch, tmp_path):
    """wandb itself ignores WANDB_DISABLED; the check lets it pass, so the run must set the mode."""
    from cogft.tracking import trackers_for

    monkeypatch.setenv("WANDB_DISABLED", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # restored afterwards, like WANDB_MODE
    trackers_for(make_config("tracking.report_to=wandb", "tracking.wandb_mode=null"), tmp_path)
    assert os.environ["WANDB_MODE"] == "disabled"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_cache) -> Path:
    """4 LoRA steps, checkpoints at 2 and 4, the final export at 4."""
    from cogft.config_file import load_config
    from cogft.training.loop import train

    return train(load_config(REPO / "configs" / "tiny-lora.yaml", [
        f"data.path={REPO / 'data'}", f"data.cache_dir={shared_cache}",
        f"output_dir={tmp_path_factory.mktemp('trained') / 'run'}", "tracking.report_to=none",
        "train.max_steps=4", "train.checkpoint_every=2", "validation.prompts=[]"]))


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A copy of the trained run for one test to damage."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def truncate(file: Path) -> Path:
    file.write_bytes(file.read_bytes()[:100])  # a disk, or a copy, that lost the end of the file
    return file


def without_export(run: Path) -> Path:
    """The run as a kill after its last checkpoint and before the final export leaves it."""
    shutil.rmtree(run / "lora")
    (run / "export.json").unlink()
    return run


def sample(source: Path, out: Path) -> int:
    return main(["sample", "--from", str(source), "--prompt", "a red square", "--out", str(out), "--steps", "2"])


def test_sample_from_a_damaged_checkpoint_names_the_file_and_offers_intact_weights(run, tmp_path, capsys):
    damaged = truncate(run / "checkpoints" / "step-000004" / LORA)
    assert sample(run / "checkpoints" / "step-000004", tmp_path / "a.mp4") == 2
    error = capsys.readouterr().err
    assert f"{damaged} is truncated or changed" in error and f"--from {run}\n" in error  # the export, step 4
    assert "Traceback" not in error and not (tmp_path / "a.mp4").exists()

    without_export(run)
    assert main(["export", "--from", str(run / "checkpoints" / "step-000004"), "--out", str(tmp_path / "x")]) == 2
    assert f"--from {run / 'checkpoints' / 'step-000002'}\n" in capsys.readouterr().err  # no export: the checkpoint


def test_from_a_run_skips_its_damaged_newest_checkpoint(run, tmp_path, caplog):
    """No export (killed before it): the newest checkpoint is damaged, the one before it is sampled and exported."""
    damaged = truncate(without_export(run) / "checkpoints" / "step-000004" / LORA)
    with caplog.at_level(logging.WARNING):
        assert sample(run, tmp_path / "a.mp4") == 0
    assert (tmp_path / "a.mp4").stat().st_size > 0
    assert f"{damaged} is truncated or changed" in caplog.text and "step-000002" in caplog.text
    assert main(["export", "--from", str(run), "--out", str(tmp_path / "exported")]) == 0
    previous = load_file(run / "checkpoints" / "step-000002" / LORA)
    exported = load_file(tmp_path / "exported" / LORA)  # released in the model's dtype (fp16 for 2B)
    assert exported.keys() == previous.keys() and all(torch.equal(exported[k], previous[k].half()) for k in previous)


def test_from_a_run_skips_a_damaged_export(run, tmp_path, caplog, capsys):
    """The export records no sizes: a partial copy of it is found from its safetensors header."""
    damaged = truncate(run / "lora" / LORA)
    with caplog.at_level(logging.WARNING):
        assert main(["export", "--from", str(run), "--out", str(tmp_path / "exported")]) == 0
    assert f"{damaged} is not a whole safetensors file" in caplog.text
    newest = load_file(run / "checkpoints" / "step-000004" / LORA)
    exported = load_file(tmp_path / "exported" / LORA)  # released in the model's dtype (fp16 for 2B)
    assert exported.keys() == newest.keys() and all(torch.equal(exported[k], newest[k].half()) for k in newest)

    for checkpoint in (run / "checkpoints").iterdir():
        truncate(checkpoint / LORA)
    assert sample(run, tmp_path / "a.mp4") == 2  # nothing intact left: refused, naming each damaged file
    error = capsys.readouterr().err
    assert "all of the run's trained weights are damaged" in error and str(damaged) in error
