"""Image-to-video: conditioning images from the dataset (first frame, images.txt, a metadata column), their cache,
bad images as per-clip skips, the fixed size of 5B-I2V, and a LoRA that learns from the image and loads into
a stock `CogVideoXImageToVideoPipeline`. The parity of the step's inputs with the stock pipeline's (channels,
image-latent scale, ofs) is in test_variants.py with the other variants."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cogft.config import ConfigError
from cogft.data.sources import DatasetLayoutError, read_clips

REPO = Path(__file__).resolve().parent.parent
CLIPS = ("bouncing_square", "fractal_zoom", "test_pattern")


def _dataset(folder: Path, images: list[str] | None) -> Path:
    """Three sample clips listed in videos.txt, with an images.txt when `images` is given."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CLIPS:
        shutil.copy(REPO / "data" / "videos" / f"{name}.mp4", folder)
    (folder / "videos.txt").write_text("".join(f"{n}.mp4\n" for n in CLIPS))
    (folder / "prompts.txt").write_text("".join(f"{n.replace('_', ' ')}\n" for n in CLIPS))
    if images is not None:
        (folder / "images.txt").write_text("".join(f"{i}\n" for i in images))
    return folder


def test_conditioning_images_are_read_from_images_txt_and_metadata_columns(tmp_path):
    folder = _dataset(tmp_path / "pair", ["start.png", "", "other.jpg"])
    clips = read_clips(folder)
    assert [c.image for c in clips] == [folder / "start.png", None, folder / "other.jpg"]  # blank: first frame

    (folder / "images.txt").write_text("start.png\n")
    with pytest.raises(DatasetLayoutError, match="images.txt has 1 lines but videos.txt has 3"):
        read_clips(folder)

    (tmp_path / "meta.csv").write_text("video,caption,still\npair/a.mp4,a,pair/a.png\npair/b.mp4,b,\n")
    clips = read_clips(tmp_path / "meta.csv", image_column="still")
    assert [c.image for c in clips] == [tmp_path / "pair" / "a.png", None]
    assert [c.image for c in read_clips(tmp_path / "meta.csv")] == [None, None]  # no "image" column: first frames


def test_bad_conditioning_images_skip_their_clip_with_the_reason_and_changed_ones_are_encoded_again(make_config,
                                                                                                    tmp_path):
    from PIL import Image

    from cogft.data.cache import prepare
    from cogft.models.loading import load_for_config

    folder = _dataset(tmp_path / "clips", ["missing.png", "broken.png", "square.png"])
    (folder / "broken.png").write_text("not an image")
    Image.new("RGB", (200, 200), (200, 30, 30)).save(folder / "square.png")  # another size and shape than the clips
    config, variant = load_for_config(make_config("model.path=tiny://5b-i2v", f"data.path={folder}",
                                                  f"data.cache_dir={tmp_path / 'cache'}", "validation.prompts=[]",
                                                  "validation.images=[]"))
    prepared = prepare(config, variant, torch.device("cpu"), show_progress=False)
    rows = {Path(r["clip"]).stem: r for r in prepared.report if "clip" in r}
    assert rows["bouncing_square"]["problem"] == "image_missing" and "missing.png" in rows["bouncing_square"]["reason"]
    assert rows["fractal_zoom"]["problem"] == "image_unreadable" and "broken.png" in rows["fractal_zoom"]["reason"]
    kept = rows["test_pattern"]
    assert kept["status"] == "encoded" and kept["image"].endswith("square.png")
    assert any("conditioning image 200x200 scaled to 96x96, centre-cropped to 96x64" in n for n in kept["notes"])
    [entry] = prepared.entries
    from safetensors.torch import load_file

    cached = load_file(entry.latents[0])
    assert cached["image_mean"].shape == (config.data.image_noise_draws, 4, 1, 8, 12)

    again = prepare(config, variant, torch.device("cpu"), show_progress=False)
    assert again.summary["cached"] == 1 and again.summary["encoded"] == 0
    Image.new("RGB", (200, 200), (30, 200, 30)).save(folder / "square.png")  # the image changed: its clip again
    changed = prepare(config, variant, torch.device("cpu"), show_progress=False)
    assert changed.summary["encoded"] == 1
    assert not torch.equal(load_file(changed.entries[0].latents[0])["image_mean"], cached["image_mean"])


@pytest.mark.parametrize("override,said", [
    ("data.num_frames=33", "data.num_frames=33: cogvideox-5b-i2v takes only 9 frames at 64x96"),
    ("data.min_frames=5", "data.min_frames=5: cogvideox-5b-i2v takes only 9 frames"),
    ("data.width=128", "data.width=128: cogvideox-5b-i2v takes only 9 frames at 64x96"),
    ("validation.images=[]", "validation.images: cogvideox-5b-i2v makes a video from an image and a prompt"),
    ("validation.images=[data/images/nope.jpg,data/images/fractal_zoom.jpg]", "data/images/nope.jpg not found"),
    ("model.path=tiny://5b", "validation.images: cogvideox-5b is text-to-video and takes no image"),
])
def test_what_an_image_to_video_run_cannot_use_is_refused_by_key_before_any_work(tmp_path, capsys, override, said):
    from cogft.cli import main

    code = main(["train", "--config", "configs/tiny-i2v-lora.yaml", f"output_dir={tmp_path / 'run'}",
                 "tracking.report_to=none", f"data.cache_dir={tmp_path / 'cache'}", override])
    assert code == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_the_real_5b_i2v_is_fixed_to_its_native_clip_and_1_5_i2v_follows_1_5():
    from cogft.config_file import build_config
    from cogft.models.loading import load_for_config

    raw = {"model": {"path": "THUDM/CogVideoX-5b-I2V"}, "data": {"path": "clips"}, "output_dir": "run"}
    config, variant = load_for_config(build_config(raw))
    data = config.data
    assert (data.num_frames, data.height, data.width, data.shortest_bucket) == (49, 480, 720, 49)
    with pytest.raises(ConfigError, match="data.num_frames=33: cogvideox-5b-i2v takes only 49 frames at 480x720"):
        load_for_config(build_config({**raw, "data": {"path": "clips", "num_frames": 33}}))
    raw["model"]["path"] = "THUDM/CogVideoX1.5-5B-I2V"
    config, variant = load_for_config(build_config(raw))
    assert (config.data.num_frames, config.data.height, config.data.width, config.data.fps) == (81, 768, 1360, 16.0)
    assert variant.tokens(81, 768, 1360) == 45_106


STOCK_I2V_LOAD = r"""
import sys, torch
from PIL import Image
from diffusers import CogVideoXImageToVideoPipeline
pipe = CogVideoXImageToVideoPipeline.from_pretrained(sys.argv[1])
kw = dict(image=Image.open(sys.argv[3]), prompt="a red square", num_frames=9, height=64, width=96,
          num_inference_steps=2, max_sequence_length=16, output_type="latent")
base = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
pipe.load_lora_weights(sys.argv[2])
tuned = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
assert "cogft" not in sys.modules
print((tuned - base).abs().max().item())
"""


def _first_latent_frame(pipe, image) -> torch.Tensor:
    video = pipe(image=image, prompt="a red square bouncing across a blue background", num_frames=9, height=64,
                 width=96, num_inference_steps=10, guidance_scale=6.0, output_type="latent", max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0)).frames
    return video[0, 0]


def test_a_tiny_i2v_lora_trained_on_one_clip_starts_its_video_closer_to_the_image(make_config, tmp_path):
    """Trained on one clip conditioned on its first frame, the LoRA's sample starts (latent frame 0) nearer that
    image's latent than the untrained model's does; another image gives another start; and the exported LoRA
    changes a stock `CogVideoXImageToVideoPipeline` in a process without cogft. (The tiny VAE is random, so the
    comparison is in latent space, where the model works.)"""
    from cogft.data.images import conditioning_image
    from cogft.inference.sampling import pipeline_with_weights, trained_variant
    from cogft.models.loading import load_pipeline, resolve_model_path
    from cogft.run_dir import resolve_trained
    from cogft.training.loop import train

    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(REPO / "data" / "videos" / "bouncing_square.mp4", folder)
    (folder / "videos.txt").write_text("bouncing_square.mp4\n")
    (folder / "prompts.txt").write_text("a red square bouncing across a blue background\n")
    run = train(make_config("model.path=tiny://5b-i2v", "model.dtype=fp32", f"data.path={folder}",
                            "validation.prompts=[]", "validation.images=[]", "train.max_steps=100",
                            "train.batch_size=1", "train.learning_rate=1e-2", base="tiny-i2v-lora.yaml"))
    trained = resolve_trained(str(run))
    variant = trained_variant(trained)
    image = conditioning_image(REPO / "data" / "images" / "bouncing_square.jpg", 64, 96, "crop", "image")
    base = load_pipeline(trained.config.model.path, variant, torch.float32)
    base.set_progress_bar_config(disable=True)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0
    with torch.no_grad():
        target = base.vae.encode(pixels[None, :, None]).latent_dist.mean[0, :, 0] * variant.scaling_factor
        tuned = pipeline_with_weights(trained, variant, torch.device("cpu"))
        tuned.set_progress_bar_config(disable=True)
        before = ((_first_latent_frame(base, image) - target) ** 2).mean().item()
        start = _first_latent_frame(tuned, image)
        after = ((start - target) ** 2).mean().item()
        other = conditioning_image(REPO / "data" / "images" / "fractal_zoom.jpg", 64, 96, "crop", "image")
        assert not torch.equal(_first_latent_frame(tuned, other), start)
    assert after < 0.75 * before, (before, after)

    result = subprocess.run(
        [sys.executable, "-c", STOCK_I2V_LOAD, resolve_model_path("tiny://5b-i2v"), str(run / "lora"),
         str(REPO / "data" / "images" / "bouncing_square.jpg")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, cwd="/",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) > 1e-4


def test_validation_and_sample_render_from_the_configured_images(make_config, tmp_path, capsys):
    """Validation videos start from validation.images; `cogft sample --image` from any checkpoint, and refuses a
    missing image, a size the model cannot make, and an image-to-video model without an image."""
    import decord

    from cogft.cli import main
    from cogft.training.loop import train

    run = train(make_config("train.max_steps=2", "validation.every=2", "validation.num_inference_steps=2",
                            base="tiny-i2v-lora.yaml"))
    videos = sorted(run.glob("samples/*.mp4"))
    assert len(videos) == 2 and len(decord.VideoReader(str(videos[0]))) == 9
    out = tmp_path / "s.mp4"
    checkpoint = run / "checkpoints" / "step-000002"
    assert main(["sample", "--from", str(checkpoint), "--image", "data/images/fractal_zoom.jpg", "--prompt", "x",
                 "--out", str(out), "--steps", "2"]) == 0
    assert len(decord.VideoReader(str(out))) == 9
    for args, said in ((["--image", "nope.png"], "--image: conditioning image nope.png not found"),
                       ([], "--image: cogvideox-5b-i2v makes a video from an image"),
                       (["--image", "data/images/fractal_zoom.jpg", "--frames", "17"],
                        "--frames=17: cogvideox-5b-i2v takes only 9 frames")):
        assert main(["sample", "--from", str(run), "--prompt", "x", "--out", str(out), *args]) == 2, args
        assert said in capsys.readouterr().err


def test_a_1_5_i2v_prepare_report_names_each_clips_image(make_config, tmp_path):
    from cogft.data.cache import prepare
    from cogft.models.loading import load_for_config

    folder = _dataset(tmp_path / "clips", None)
    config, variant = load_for_config(make_config("model.path=tiny://1.5-5b-i2v", f"data.path={folder}",
                                                  "validation.prompts=[]", "validation.images=[]"))
    report = prepare(config, variant, torch.device("cpu"), show_progress=False).report
    assert [r["image"] for r in report if "clip" in r] == ["first frame"] * 3
    json.dumps(report)  # the report stays JSON


def test_noisy_image_encodings_are_seeded_and_made_one_image_at_a_time(make_config):
    """The K draws depend only on the seed (the clip's content), and each goes through the VAE alone, as the stock
    pipeline encodes its image: a batch of single frames is split along time by the VAE's memory-safe convolution at
    full size, below its kernel (a crash measured at 768x1360 on an H200)."""
    from cogft.models.cogvideox.image_to_video import encode_noisy_images
    from cogft.models.loading import load_vae, load_variant

    variant = load_variant("tiny://5b-i2v", "fp32")
    vae = load_vae("tiny://5b-i2v", variant, torch.float32)
    batches = []
    encode = vae.encode
    vae.encode = lambda pixels: batches.append(pixels.shape[0]) or encode(pixels)
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    first = encode_noisy_images(vae, image, 3, seed=7, device=torch.device("cpu"), dtype=torch.float32)
    assert batches == [1, 1, 1] and first["image_mean"].shape == (3, 4, 1, 8, 12)
    again = encode_noisy_images(vae, image, 3, seed=7, device=torch.device("cpu"), dtype=torch.float32)
    other = encode_noisy_images(vae, image, 3, seed=8, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(first["image_mean"], again["image_mean"])
    assert not torch.equal(first["image_mean"], other["image_mean"])
    assert not torch.equal(first["image_mean"][0], first["image_mean"][1])  # each draw its own noise


def test_doctor_reads_each_clips_conditioning_image_before_any_gpu_time(tmp_path):
    from PIL import Image

    from cogft.data.doctor import diagnose

    folder = _dataset(tmp_path / "clips", ["missing.png", "", "square.png"])
    Image.new("RGB", (200, 200)).save(folder / "square.png")
    report = diagnose(REPO / "configs" / "tiny-i2v-lora.yaml", [f"data.path={folder}", "validation.prompts=[]",
                                                                "validation.images=[]"])
    rows = {Path(r["clip"]).stem: r for r in report["files"]}
    assert rows["bouncing_square"]["verdict"] == "skip"
    assert rows["bouncing_square"]["problems"][0]["code"] == "image_missing"
    assert rows["fractal_zoom"]["image"] == "first frame" and rows["fractal_zoom"]["verdict"] == "ok"
    assert any("conditioning image 200x200" in n for n in rows["test_pattern"]["notes"])


def test_image_to_video_full_fine_tuning_and_merged_export_give_the_stock_i2v_pipeline(make_config, tmp_path):
    """SFT of an image-to-video model exports its transformer; `export --merge` writes a folder that the stock
    image-to-video pipeline class loads."""
    from diffusers import CogVideoXImageToVideoPipeline

    from cogft.inference.export import export
    from cogft.training.loop import train

    run = train(make_config("train.max_steps=2", "validation.prompts=[]", "validation.images=[]",
                            "model.path=tiny://1.5-5b-i2v", base="tiny-sft.yaml"))
    assert (run / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    merged = export(str(run), str(tmp_path / "merged"), merge=True)
    assert json.loads((merged / "model_index.json").read_text())["_class_name"] == "CogVideoXImageToVideoPipeline"
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(merged))
    assert pipe.transformer.config.ofs_embed_dim is not None
