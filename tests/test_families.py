"""The model-family seam is real: a family registered from the tests (`toy_family.py`: another transformer, VAE,
text encoder and objective) goes through prepare, train, resume, sample and export by the public CLI, and no file
under cogft/ knows its name; nothing outside cogft/models/ knows a CogVideoX class or its image latents."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogft.cli import main

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cogft"


@pytest.fixture(autouse=True)
def toy_registered():
    """The toy family registered for this module's tests only (importing it registers it, as a plugin named in
    `COGFT_FAMILIES` would be): other tests see CogVideoX alone."""
    from cogft.models import registry

    before = list(registry._FAMILIES)
    import toy_family

    registry.register_family(toy_family.FAMILY)
    yield toy_family
    registry._FAMILIES[:] = before


def _sources(root: Path) -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(root.rglob("*.py"))}


def _toy_config(tmp_path: Path, out: str) -> list[str]:
    """Two of the sample clips (a small dataset keeps the test fast), validated at the end of each run."""
    data = tmp_path / "clips"
    if not data.exists():
        videos = (REPO / "data" / "videos.txt").read_text().splitlines()[:2]
        (data / "videos").mkdir(parents=True)
        for video in videos:
            shutil.copy(REPO / "data" / video, data / video)
        (data / "videos.txt").write_text("\n".join(videos))
        (data / "prompts.txt").write_text("\n".join((REPO / "data" / "prompts.txt").read_text().splitlines()[:2]))
    return ["--config", str(REPO / "configs" / "tiny-lora.yaml"), "model.path=tiny://toy", f"data.path={data}",
            f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / out}", "tracking.report_to=none",
            "validation.prompts=[a red square]", "validation.every=100", "validation.num_inference_steps=2",
            "train.checkpoint_every=2", "train.batch_size=1", "lora.rank=4", "lora.alpha=4",
            "train.learning_rate=1e-2"]


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_a_family_registered_from_outside_trains_resumes_samples_and_exports(tmp_path):
    from cogft.models.loading import resolve_model_path
    from toy_family import ToyPipeline

    straight, resumed = (tmp_path / name for name in ("straight", "resumed"))
    assert main(["prepare", *_toy_config(tmp_path, "straight")]) == 0
    assert main(["train", *_toy_config(tmp_path, "straight"), "train.max_steps=4"]) == 0
    assert main(["train", *_toy_config(tmp_path, "resumed"), "train.max_steps=2"]) == 0
    assert main(["train", *_toy_config(tmp_path, "resumed"), "train.max_steps=4"]) == 0
    assert len(_losses(straight)) == 4 and _losses(straight) == _losses(resumed)  # the resume is bit-exact
    assert sorted(p.name for p in (straight / "samples").glob("*.mp4"))  # validation rendered through its pipeline
    cached = load_file(next((tmp_path / "cache" / "latents").rglob("*.safetensors")))
    assert {"toy_mean", "toy_logvar"} <= set(cached)  # the family's own keys, carried by the cache untouched

    video = tmp_path / "sample.mp4"
    assert main(["sample", "--from", str(straight), "--prompt", "a red square", "--out", str(video),
                 "--steps", "2"]) == 0
    import decord

    assert len(decord.VideoReader(str(video))) == 9

    exported = tmp_path / "export"
    assert main(["export", "--from", str(straight), "--out", str(exported)]) == 0
    lora = load_file(exported / "pytorch_lora_weights.safetensors")
    assert lora and all(key.startswith("transformer.") for key in lora)

    def render(with_lora: bool) -> torch.Tensor:
        pipe = ToyPipeline.from_pretrained(resolve_model_path("tiny://toy"))
        if with_lora:
            pipe.load_lora_weights(str(exported))
        return pipe(prompt="a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames

    assert not torch.equal(render(False), render(True))  # its pipeline loads the LoRA, which changes the output


def test_no_file_under_cogft_knows_the_toy_family():
    for path, text in _sources(PACKAGE).items():
        assert not re.search(r"toy_family|ToyDiT|ToyPipeline|toydit", text), path


def test_nothing_outside_models_knows_a_cogvideox_class_or_its_image_latents():
    """The trainer, data stack, inference and bench ask the family; CogVideoX lives in cogft/models/cogvideox/."""
    named = re.compile(r"\bCogVideoX\w*(Pipeline|Model|Mixin|Scheduler|Block|Processor)\b|AutoencoderKLCogVideoX"
                       r"|image_mean|image_logvar|image_latents?\b|control_latents\b")
    found = [f"{path.relative_to(REPO)}: {match.group(0)}" for path, text in _sources(PACKAGE).items()
             if PACKAGE / "models" not in path.parents for match in [named.search(text)] if match]
    assert not found, found
    outside = [path for path, text in _sources(PACKAGE).items() if PACKAGE / "models" not in path.parents
               and re.search(r"models\.cogvideox|from \.cogvideox", text)]
    assert not outside, f"imports of the CogVideoX package outside cogft/models/: {outside}"


@pytest.mark.parametrize("short", ["2b", "5b-i2v"])
def test_unknown_configs_name_every_family(short, tmp_path):
    """A pipeline no family matches is refused by name, listing the variants of every registered family."""
    from cogft.models.family import UnsupportedModelError
    from cogft.models.registry import spec_for, spec_named

    configs = spec_named(short, "tiny://").tiny
    odd = type(configs)(model_index={"_class_name": "SomethingElse"}, transformer=configs.transformer,
                        vae=configs.vae, scheduler=configs.scheduler)
    with pytest.raises(UnsupportedModelError, match=r"toydit \(nobody/toydit\)"):
        spec_for(odd, "somewhere")
