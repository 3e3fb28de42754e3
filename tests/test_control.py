"""Control-video training: a widened text-to-video model starts as the base model, trains and resumes with its
controls, exports a folder that diffusers' own control pipeline runs without cogft, and bad control input is
refused by key or skipped per clip with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cogft.cli import main
from cogft.config import ConfigError
from cogft.models.family import ModelInputs
from cogft.models.loading import load_transformer, load_variant
from cogft.training.loop import train
from test_train import losses

REPO = Path(__file__).resolve().parent.parent
VIDEOS = REPO / "data" / "videos"
CONTROL = ["model.control=true", "data.control=canny"]
FAST = ["validation.prompts=[]", "validation.controls=[]", "train.checkpoint_every=100"]


@pytest.mark.parametrize("short", ["2b", "5b", "1.5-5b"])
def test_a_widened_model_predicts_exactly_what_its_base_model_does_until_it_trains(short):
    """The new input channels start at zero: any control video leaves step 0's prediction as the base model's."""
    base, widened = load_variant(f"tiny://{short}", "fp32"), load_variant(f"tiny://{short}", "fp32", control=True)
    assert widened.name == f"{base.name}-control" and widened.conditions == ("control",)
    assert widened.configs.transformer["in_channels"] == 2 * base.latent_channels
    plain, wide = load_transformer(f"tiny://{short}", base), load_transformer(f"tiny://{short}", widened)
    assert wide.config.in_channels == 2 * plain.config.in_channels
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, base.latent_channels, 8, 12, generator=generator)
    prompt = torch.randn(1, base.max_text_seq_length, base.text_embed_dim, generator=generator)
    t = torch.tensor([700])
    control = {"control_latents": torch.randn(x.shape, generator=generator)}
    with torch.no_grad():
        expected = base.predict(plain, x, t, ModelInputs(x, x, t, prompt))
        got = widened.predict(wide, x, t, ModelInputs(x, x, t, prompt, control))
    assert torch.equal(got, expected)
    with torch.no_grad():  # and the control does reach the prediction once its weights are not zero
        wide.patch_embed.proj.weight[:, base.latent_channels:] += 0.1
        assert not torch.equal(widened.predict(wide, x, t, ModelInputs(x, x, t, prompt, control)), expected)


@pytest.fixture(scope="module")
def control_run(tmp_path_factory, shared_cache):
    """6 steps of the tiny control LoRA (canny controls), validated at the end with its control video."""
    from cogft.config_file import load_config

    out = tmp_path_factory.mktemp("control") / "run"
    config = load_config(REPO / "configs" / "tiny-control-lora.yaml", [
        f"data.path={REPO / 'data'}", f"data.cache_dir={shared_cache}", f"output_dir={out}", "train.max_steps=6",
        "validation.num_inference_steps=2", "train.learning_rate=1e-2", "train.checkpoint_every=100",
    ])
    return train(config)


STOCK_CONTROL = r"""
import sys, numpy, torch
from PIL import Image
from diffusers import CogVideoXFunControlPipeline
pipe = CogVideoXFunControlPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
control = [Image.fromarray(frame) for frame in numpy.load(sys.argv[2])]
latents = pipe(prompt="a red square", control_video=control, height=64, width=96, num_inference_steps=3,
               guidance_scale=6.0, max_sequence_length=16, output_type="latent",
               generator=torch.Generator().manual_seed(3)).frames
assert "cogft" not in sys.modules
torch.save(latents, sys.argv[3])
"""


def test_the_control_lora_exports_the_widened_input_and_merges_into_a_stock_control_pipeline(control_run, tmp_path):
    """The plain export holds the LoRA and the widened input, and its model card's code loads them into a stock
    control pipeline; the merged export is a control pipeline folder that reproduces cogft's own sample; both in a
    process without cogft."""
    import re

    from cogft.data.control import read_control
    from cogft.inference.render import write_mp4
    from cogft.inference.sampling import pipeline_with_weights, trained_variant
    from cogft.models.loading import resolve_model_path
    from cogft.run_dir import resolve_trained

    lora = control_run / "lora"
    widened = load_file(lora / "trained_modules.safetensors")
    assert set(widened) == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert widened["patch_embed.proj.weight"][:, 4:].abs().sum() > 0  # the control's channels trained
    assert "trained_modules.safetensors" in (lora / "README.md").read_text()
    assert sorted((control_run / "samples").glob("*.mp4"))  # validation rendered with its control video

    plain = tmp_path / "plain"
    assert main(["export", "--from", str(control_run), "--out", str(plain)]) == 0
    assert (plain / "trained_modules.safetensors").is_file() and (plain / "pytorch_lora_weights.safetensors").is_file()

    merged = tmp_path / "merged"
    assert main(["export", "--from", str(control_run), "--out", str(merged), "--merge"]) == 0
    index = json.loads((merged / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXFunControlPipeline" and index["scheduler"][1] == "CogVideoXDDIMScheduler"

    trained = resolve_trained(str(control_run))
    variant = trained_variant(trained)
    control = read_control(str(VIDEOS / "bouncing_square.mp4"), 9, 64, 96, trained.config.data, "test",
                           torch.device("cpu"))
    np.save(tmp_path / "control.npy", np.stack([np.asarray(frame) for frame in control]))
    pipe = pipeline_with_weights(trained, variant, torch.device("cpu"))
    conditioning = variant.pipeline_inputs(prompt="a red square", prompt_embeds=None, negative_prompt_embeds=None,
                                           control=control)
    ours = variant.render_latents(pipe, conditioning, num_frames=9, height=64, width=96, steps=3, guidance_scale=6.0,
                                  generator=torch.Generator().manual_seed(3))
    # one process without cogft: the card's own code on the plain export (the tiny model's prompts are 16 tokens,
    # not the 226 the pipeline assumes), then the merged export rendered as cogft rendered it
    card = re.search(r"```python\n(.*?)```", (plain / "README.md").read_text(), re.S).group(1)
    card = card.replace('"tiny://2b"', repr(resolve_model_path("tiny://2b"))).replace("PATH_OR_REPO", str(plain))
    card = card.replace(")).frames[0]", "), max_sequence_length=16, num_inference_steps=2).frames[0]")
    write_mp4(np.stack([np.asarray(frame) for frame in control]) / 255.0, tmp_path / "control.mp4", 8)
    script = card + "\nassert len(video) == 9\n" + STOCK_CONTROL
    result = subprocess.run([sys.executable, "-c", script, str(merged), str(tmp_path / "control.npy"),
                             str(tmp_path / "stock.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, script + result.stderr[-3000:]
    stock = torch.load(tmp_path / "stock.pt")
    # the merged export is in the model's fp16: its sample is cogft's own up to that rounding
    assert ((stock - ours).norm() / ours.norm()).item() < 2e-2


def test_control_runs_resume_bit_exactly(make_config):
    common = [*CONTROL, *FAST, "data.windows=2"]
    straight = train(make_config(*common, "train.max_steps=4", out="straight"))
    train(make_config(*common, "train.max_steps=2", out="resumed"))
    resumed = train(make_config(*common, "train.max_steps=4", out="resumed"))
    assert losses(straight) == losses(resumed) and len(losses(resumed)) == 4
    for name in ("pytorch_lora_weights.safetensors", "trained_modules.safetensors"):
        a, b = load_file(straight / "lora" / name), load_file(resumed / "lora" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _short_video(source: Path, target: Path, seconds: float) -> Path:
    from imageio_ffmpeg import get_ffmpeg_exe

    subprocess.run([get_ffmpeg_exe(), "-loglevel", "error", "-i", str(source), "-t", str(seconds), "-an", "-y",
                    str(target)], check=True)
    return target


def test_bad_controls_skip_their_clips_with_the_reason(make_config, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("bouncing_square", "fractal_zoom", "game_of_life", "test_pattern", "rotating_gradient"):
        shutil.copy(VIDEOS / f"{name}.mp4", folder)
    shutil.copy(VIDEOS / "wide_cellular.mp4", folder)
    (folder / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    _short_video(VIDEOS / "rotating_gradient.mp4", folder / "short.mp4", 0.5)
    pairs = [("bouncing_square", "rotating_gradient.mp4"), ("fractal_zoom", "wide_cellular.mp4"),
             ("game_of_life", "broken.mp4"), ("test_pattern", "short.mp4"), ("rotating_gradient", ""),
             ("wide_cellular", "missing.mp4")]
    (folder / "videos.txt").write_text("".join(f"{clip}.mp4\n" for clip, _ in pairs))
    (folder / "prompts.txt").write_text("a clip\n" * len(pairs))
    (folder / "controls.txt").write_text("".join(f"{control}\n" for _, control in pairs))
    run = tmp_path / "run"
    assert main(["prepare", "--config", "configs/tiny-lora.yaml", f"data.path={folder}", f"output_dir={run}",
                 "model.control=true", f"data.cache_dir={tmp_path / 'cache'}", "validation.prompts=[]"]) == 0
    rows = [json.loads(line) for line in (run / "prepare_report.jsonl").read_text().splitlines()][:-1]
    found = {Path(row["clip"]).stem: (row["status"], row.get("problem")) for row in rows}
    assert found == {"bouncing_square": ("encoded", None), "fractal_zoom": ("skipped", "control_mismatch"),
                     "game_of_life": ("skipped", "control_unreadable"),
                     "test_pattern": ("skipped", "control_too_short"), "rotating_gradient": ("skipped", "no_control"),
                     "wide_cellular": ("skipped", "control_missing")}
    assert all("control" in row["reason"] for row in rows if row["status"] == "skipped")
    assert rows[0]["control"].endswith("rotating_gradient.mp4")
    with open(folder / "controls.txt", "a") as lines:
        lines.write("extra.mp4\n")
    from cogft.data.sources import read_clips

    with pytest.raises(ValueError, match="controls.txt has 7 lines but videos.txt has 6"):
        read_clips(folder)


@pytest.mark.parametrize("overrides,said", [
    (["data.control=canny"], "data.control=canny: cogvideox-2b takes no control video; set model.control: true"),
    (["validation.prompts=[a red square]", "validation.controls=[data/videos/bouncing_square.mp4]"],
     "validation.controls: cogvideox-2b takes no control video"),
    (["model.control=true", "validation.controls=[]"],
     "validation.controls: cogvideox-2b-control makes a video from a prompt and a control video"),
    (["model.path=tiny://5b-i2v", "model.control=true", "validation.prompts=[]"],
     "model.control: cogvideox-5b-i2v already conditions on an image"),
    (["model.path=tiny://fun-2b-control", "model.control=true", "validation.prompts=[]"],
     "model.control: cogvideox-fun-2b-control already takes a control video"),
    (["model.path=tiny://1.5-5b", "model.control=true", "validation.prompts=[]"],
     "data.num_frames=9: cogvideox1.5-5b-control takes an even number of latent frames"),
])
def test_control_settings_a_model_cannot_use_are_refused_by_key_before_any_work(make_config, capsys, tmp_path,
                                                                                 overrides, said):
    code = main(["prepare", "--config", "configs/tiny-lora.yaml", f"data.path={REPO / 'data'}",
                 f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    assert code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_sampling_a_control_model_needs_its_control_video(control_run, tmp_path):
    from cogft.inference.sampling import sample

    with pytest.raises(ConfigError, match="--control: cogvideox-2b-control makes a video from a control video"):
        sample(str(control_run), "a red square", str(tmp_path / "out.mp4"), steps=1)
    written = sample(str(control_run), "a red square", str(tmp_path / "out.mp4"), steps=1,
                     control=str(VIDEOS / "fractal_zoom.mp4"))
    assert written.is_file() and written.stat().st_size > 0


def test_a_control_lora_follows_its_control_video(make_config, tmp_path):
    """Two clips under one caption: only the control tells them apart. After a short run, samples from the two
    controls differ, and each is nearer (in latent space) to the clip whose control it was given."""
    from cogft.data.control import read_control
    from cogft.data.video import DecodeSpec, decode_clip
    from cogft.inference.sampling import pipeline_with_weights, trained_variant
    from cogft.run_dir import resolve_trained

    folder = tmp_path / "two"
    folder.mkdir()
    names = ("bouncing_square", "game_of_life")  # margins 0.016-0.030 and 0.077-0.092 over seeds 42, 7, 1 and 2
    for name in names:
        shutil.copy(VIDEOS / f"{name}.mp4", folder)
    (folder / "videos.txt").write_text("".join(f"{name}.mp4\n" for name in names))
    (folder / "prompts.txt").write_text("a clip\na clip\n")
    size = ["data.height=32", "data.width=48", "lora.rank=16", "lora.alpha=16"]
    run = train(make_config(*CONTROL, *FAST, *size, f"data.path={folder}", "train.max_steps=100",
                            "train.learning_rate=5e-3", base="tiny-control-lora.yaml"))
    trained = resolve_trained(str(run))
    variant = trained_variant(trained)
    pipe = pipeline_with_weights(trained, variant, torch.device("cpu"))

    def clip_latents(name: str) -> torch.Tensor:
        frames = decode_clip(str(folder / f"{name}.mp4"), DecodeSpec((9,), 32, 48, 8.0)).frames
        pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        with torch.no_grad():
            return (pipe.vae.encode(pixels).latent_dist.mean * variant.scaling_factor).permute(0, 2, 1, 3, 4)

    def sample(name: str) -> torch.Tensor:
        control = read_control(str(folder / f"{name}.mp4"), 9, 32, 48, trained.config.data, "test", torch.device("cpu"))
        inputs = variant.pipeline_inputs(prompt="a clip", prompt_embeds=None, negative_prompt_embeds=None,
                                         control=control)
        return variant.render_latents(pipe, inputs, num_frames=9, height=32, width=48, steps=4, guidance_scale=1.0,
                                      generator=torch.Generator().manual_seed(0))

    clips = {name: clip_latents(name) for name in names}
    samples = {name: sample(name) for name in names}
    assert not torch.allclose(samples[names[0]], samples[names[1]], atol=1e-3)
    for name, other in (names, names[::-1]):
        mine, theirs = ((samples[name] - clips[clip]).pow(2).mean().item() for clip in (name, other))
        assert mine < theirs, (name, mine, theirs)


def test_the_estimate_knows_the_control_latents_a_clip_caches(make_config):
    """`cogft estimate`'s cache figure against what prepare wrote (stored in fp32 on a CPU, in the model's dtype on a
    GPU); the control model caches its control video's latents beside the clip's."""
    from safetensors import safe_open

    from cogft.data.cache import prepare
    from cogft.models.cost import cache_bytes_per_window
    from cogft.models.loading import load_for_config

    def cached_and_estimated(*overrides):
        config, variant = load_for_config(make_config(*FAST, *overrides))
        entry = prepare(config, variant, torch.device("cpu"), show_progress=False).entries[0]
        with safe_open(entry.latents[0], "pt") as handle:
            stored = sum(handle.get_tensor(key).numel() for key in handle.keys())  # noqa: SIM118
        return stored * variant.dtype.itemsize, cache_bytes_per_window(config, variant)

    plain, control = cached_and_estimated(), cached_and_estimated(*CONTROL)
    assert plain[0] == pytest.approx(plain[1], rel=0.15) and control[0] == pytest.approx(control[1], rel=0.15)
    assert control[1] == pytest.approx(1.5 * plain[1], rel=0.01)  # mean and logvar, and the control's mode


def test_a_published_control_model_fine_tunes_whole_and_samples_from_its_control(make_config, tmp_path):
    """Full fine-tuning of a CogVideoX-Fun Control folder (the tiny one): its transformer, control input and all,
    trains and is exported, and `cogft sample --control` renders from it."""
    from cogft.inference.sampling import sample

    run = train(make_config(*FAST, "model.path=tiny://fun-2b-control", "data.control=canny", "train.max_steps=2",
                            base="tiny-sft.yaml"))
    exported = json.loads((run / "transformer" / "config.json").read_text())
    assert exported["in_channels"] == 8  # the latents and the control's
    written = sample(str(run), "a red square", str(tmp_path / "out.mp4"), steps=1,
                     control=str(VIDEOS / "game_of_life.mp4"))
    assert written.stat().st_size > 0


def test_a_control_column_names_each_clips_control_video(tmp_path):
    from cogft.data.sources import DatasetLayoutError, read_clips

    (tmp_path / "meta.csv").write_text("video,caption,pose\na.mp4,a dog,a_pose.mp4\nb.mp4,a cat,\n")
    clips = read_clips(tmp_path / "meta.csv", control_column="pose", given_columns=("data.control_column",))
    assert [c.control for c in clips] == [tmp_path / "a_pose.mp4", None]
    assert [c.control for c in read_clips(tmp_path / "meta.csv")] == [None, None]  # no "control" column: none
    with pytest.raises(DatasetLayoutError, match="data.control_column='skeleton': no row of .* has that column"):
        read_clips(tmp_path / "meta.csv", control_column="skeleton", given_columns=("data.control_column",))


def test_an_extractors_settings_are_part_of_the_cache_key(make_config):
    """Changed Canny thresholds encode every clip again (its control changed); back to the old ones, all cached."""
    from cogft.data.cache import prepare
    from cogft.models.loading import load_for_config

    def statuses(*overrides) -> set[str]:
        config, variant = load_for_config(make_config(*CONTROL, *FAST, *overrides))
        report = prepare(config, variant, torch.device("cpu"), show_progress=False).report
        return {row["status"] for row in report if "status" in row}

    statuses()  # the default thresholds, cached (or encoded once here)
    assert statuses("data.canny_thresholds=[0.3,0.6]") == {"encoded"}
    assert statuses() == {"cached"}
