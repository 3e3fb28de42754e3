"""Publishing on the Hub, offline: a local folder stands in for the Hub (HfApi's create_repo and upload_folder copy
into it and record what they were asked), so the tests check what would be uploaded and with which settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from cogft.cli import main
from cogft.config import ConfigError
from cogft.inference.hub import HubPushError, card_folder, check_hub_push, push_run_export
from cogft.training.loop import train

REPO = Path(__file__).resolve().parent.parent
BASE = "THUDM/CogVideoX-2b"  # the tiny 2b stands in for it: the card's base_model is what the Hub checks


class FakeHub:
    """HfApi's two calls, copying into `root/OWNER/NAME`; `fail` makes every upload raise as a dropped network would."""

    def __init__(self, root: Path, fail: bool = False):
        self.root, self.fail, self.repos, self.uploads = root, fail, [], []

    def install(self, patch: pytest.MonkeyPatch) -> FakeHub:
        hub = self

        def create_repo(self, repo_id, **kwargs):
            hub.repos.append({"repo_id": repo_id, **kwargs})
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            hub.uploads.append(kwargs)
            if hub.fail:
                raise ConnectionError("connection reset by peer")
            shutil.copytree(kwargs["folder_path"], hub.root / kwargs["repo_id"], dirs_exist_ok=True)

        patch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        patch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        patch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")  # logged in
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests' env sets it; nothing goes out
        patch.setattr("cogft.inference.model_card._base_model", lambda config, variant: BASE)
        return self


def run_config(out: Path, cache: Path, *overrides: str):
    from cogft.config_file import load_config

    return load_config(REPO / "configs" / "tiny-lora.yaml", [
        f"data.path={REPO / 'data'}", f"data.cache_dir={cache}", f"output_dir={out}", "tracking.report_to=none",
        "train.max_steps=2", "train.checkpoint_every=2", "validation.prompts=[a red square]", "validation.every=2",
        "validation.num_inference_steps=2", *overrides])


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, shared_cache):
    """A 2-step LoRA run with tracking.push_to_hub: (run directory, the fake Hub it pushed to)."""
    base = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as patch:
        hub = FakeHub(base / "hub").install(patch)
        run = train(run_config(base / "run", shared_cache, "tracking.push_to_hub=me/tiny-lora"))
    return run, hub


def test_a_finished_run_pushes_its_export_with_the_model_card(pushed):
    run, hub = pushed
    assert hub.repos == [{"repo_id": "me/tiny-lora", "repo_type": "model", "private": None, "exist_ok": True}]
    assert [Path(u["folder_path"]) for u in hub.uploads] == [run / "lora"]
    uploaded = hub.root / "me" / "tiny-lora"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors", "sample.mp4"]
    card = ModelCard.load(uploaded / "README.md")
    assert card.data.base_model == BASE and card.data.library_name == "diffusers"
    assert (uploaded / "pytorch_lora_weights.safetensors").read_bytes() == \
        (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes()


def test_a_failed_push_keeps_the_export_and_its_advice_pushes_it(pushed, tmp_path, monkeypatch, capsys):
    """The error names the command that pushes later; that command (with --private) then uploads the same card
    and weights, and creates the repository private."""
    run, _ = pushed
    config = run_config(run, tmp_path, "tracking.push_to_hub=me/tiny-lora")
    down = FakeHub(tmp_path / "down", fail=True).install(monkeypatch)
    with pytest.raises(HubPushError) as failed:
        push_run_export(config, run)
    advice = f"cogft export --from {run} --out DIR --push-to-hub me/tiny-lora"
    assert advice in str(failed.value) and f"the export stays in {run / 'lora'}" in str(failed.value)
    assert "ConnectionError: connection reset by peer" in str(failed.value) and down.uploads
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file() and (run / "lora" / "README.md").is_file()

    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    out = tmp_path / "export"
    assert main([*advice.replace("DIR", str(out)).split()[1:], "--private"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(out), "https://huggingface.co/me/tiny-lora"]
    assert hub.repos == [{"repo_id": "me/tiny-lora", "repo_type": "model", "private": True, "exist_ok": True}]
    uploaded = hub.root / "me" / "tiny-lora"
    assert ModelCard.load(uploaded / "README.md").data.base_model == BASE
    assert (uploaded / "pytorch_lora_weights.safetensors").read_bytes() == \
        (out / "pytorch_lora_weights.safetensors").read_bytes()


def test_a_missing_login_is_refused_before_training(tmp_path, shared_cache, monkeypatch):
    FakeHub(tmp_path / "hub").install(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="tracking.push_to_hub=me/x: no Hugging Face login") as refused:
        train(run_config(out, shared_cache, "tracking.push_to_hub=me/x"))
    assert "hf auth login" in str(refused.value) and "huggingface-cli login" in str(refused.value)
    assert "HF_TOKEN" in str(refused.value)
    assert not (out / "prepare_report.jsonl").exists() and not (out / "metrics.jsonl").exists()  # nothing ran


def test_export_refuses_a_push_it_cannot_make_before_exporting(tmp_path, monkeypatch, capsys):
    """Checked before the export (which can take minutes with --merge): the run need not even exist yet."""
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["export", "--from", str(run), "--out", str(out), "--push-to-hub", "me/x"]) == 2
    assert "--push-to-hub=me/x: no Hugging Face login" in capsys.readouterr().err
    assert not out.exists() and not hub.uploads
    assert main(["export", "--from", str(run), "--out", str(out), "--private"]) == 2
    assert "--private applies to --push-to-hub" in capsys.readouterr().err and not out.exists()


def test_repository_ids_and_offline_mode_are_refused_by_name(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for bad in ("no-owner", "me/two/slashes", "me/bad name", "me/x--y"):
        with pytest.raises(ConfigError, match=f"tracking.push_to_hub={bad}: not a Hugging Face model repository id"):
            check_hub_push(bad, "tracking.push_to_hub")
    check_hub_push("me/cogvideox-lora_v1.2", "tracking.push_to_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE .* is set"):
        check_hub_push("me/x", "--push-to-hub")


def test_an_sft_export_is_pushed_from_its_transformer_folder(tmp_path):
    """The repository mirrors the folder with the card, so from_pretrained(REPO) finds config.json at its root;
    a LoRA export and a merged pipeline (no card) go whole."""
    sft = tmp_path / "sft"
    (sft / "transformer").mkdir(parents=True)
    (sft / "transformer" / "README.md").write_text("card")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "README.md").write_text("card")
    merged = tmp_path / "merged"
    (merged / "transformer").mkdir(parents=True)
    assert (card_folder(sft), card_folder(lora), card_folder(merged)) == (sft / "transformer", lora, merged)
