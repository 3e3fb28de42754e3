"""The variant contract: a variant is identified from the pipeline's own configs (or refused by name), its
geometry comes from those configs, and the training step gives the transformer exactly what the stock
diffusers pipeline gives it at inference (the guard every new variant relies on)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cogft.cli import main
from cogft.config import ConfigError
from cogft.models.cogvideox import FAMILY
from cogft.models.family import UnsupportedModelError
from cogft.models.loading import load_transformer, load_variant, pipeline_configs, resolve_model_path
from cogft.models.registry import spec_named

SPECS = FAMILY.specs  # the CogVideoX variants (a test may register another family for itself)
# the text-to-video models widened by model.control, beside the published control models among SPECS
WIDENED = ["2b+control", "5b+control", "1.5-5b+control"]

REPO = Path(__file__).resolve().parent.parent
SIZES = [(9, 64, 96), (17, 64, 128)]  # the tiny model's native size, and one whose rotary grid is cropped


def _kwargs_of_first_forward(transformer, run) -> dict:
    """The keyword arguments of the first call to `transformer.forward` while `run()` runs."""
    seen = []
    handle = transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs) or None,
                                                   with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    assert seen, "the transformer was never called"
    return seen[0]


def _layout(kwargs: dict) -> dict:
    """What must agree: every input that is given, its per-sample shape and its dtype."""
    layout = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            layout[key] = (tuple(value.shape[1:]), value.dtype)
        elif isinstance(value, tuple):
            layout[key] = tuple((tuple(t.shape), t.dtype) for t in value)
        elif value is not None and key != "return_dict":
            layout[key] = value
    return layout


def first_frame(frames: int, height: int, width: int):
    """The first training frame of the first sample clip, as cogft crops it: what an I2V step conditions on."""
    from PIL import Image

    from cogft.data.video import DecodeSpec, decode_clip

    decoded = decode_clip(str(REPO / "data" / "videos" / "bouncing_square.mp4"),
                          DecodeSpec((frames,), height, width, 8.0))
    return Image.fromarray(decoded.frames[0])


def control_frames(frames: int, height: int, width: int):
    """The Canny edges of the first sample clip's training frames, as prepare makes them with `data.control: canny`
    (the control the training side trains on)."""
    from PIL import Image

    from cogft.config import DataConfig
    from cogft.data.control import extract_control
    from cogft.data.video import DecodeSpec, decode_clip

    decoded = decode_clip(str(REPO / "data" / "videos" / "bouncing_square.mp4"),
                          DecodeSpec((frames,), height, width, 8.0))
    edges = extract_control(decoded.frames, DataConfig(path="data", control="canny"), torch.device("cpu"))
    return [Image.fromarray(frame) for frame in edges]


def _stock_inputs(path: str, variant, frames: int, height: int, width: int) -> dict:
    """What the stock pipeline gives its transformer: two denoising steps with guidance, as a user would call it
    (image-to-video: from the first frame of the clip the training side trains on; control: from that clip's edges,
    and a widened model's transformer and scheduler as cogft loads them, around the stock pipeline)."""
    from cogft.models.loading import load_pipeline

    if variant.spec.name.endswith("-control") and getattr(variant.spec, "widened", False):
        pipe = load_pipeline(path, variant, torch.float32)
    else:
        pipe = variant.spec.diffusers_class("pipeline").from_pretrained(resolve_model_path(path))
    pipe.set_progress_bar_config(disable=True)
    conditions = {"num_frames": frames}
    if "image" in variant.conditions:
        conditions["image"] = first_frame(frames, height, width)
    if "control" in variant.conditions:  # the control video's length is the video's
        conditions = {"control_video": control_frames(frames, height, width)}
    return _kwargs_of_first_forward(pipe.transformer, lambda: pipe(
        prompt="a red ball", height=height, width=width, num_inference_steps=2,
        guidance_scale=6.0, output_type="latent", max_sequence_length=variant.max_text_seq_length,
        generator=torch.Generator().manual_seed(0), **conditions))


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory) -> Path:
    """The clip both sides condition on, alone in a list: prepare encodes one clip, not the six sample clips."""
    folder = tmp_path_factory.mktemp("one_clip")
    (folder / "videos.txt").write_text(str(REPO / "data" / "videos" / "bouncing_square.mp4") + "\n")
    (folder / "prompts.txt").write_text("a red ball\n")
    return folder


def _training_inputs(make_config, path: str, variant, frames: int, height: int, width: int, data: Path) -> dict:
    """What cogft's training step gives it for a prepared clip of the same size (the one clip in `data`)."""
    from accelerate import Accelerator

    from cogft.data.cache import prepare
    from cogft.data.dataset import LatentDataset, collate
    from cogft.models.loading import load_scheduler
    from cogft.training.assemble import assemble_step
    from cogft.training.checkpointing import sample_generators

    control = ["model.control=true"] * getattr(variant.spec, "widened", False)
    control += ["data.control=canny"] * ("control" in variant.conditions)
    config = make_config(f"model.path={path}", f"data.path={data}", "model.dtype=fp32", f"data.num_frames={frames}",
                         f"data.height={height}", f"data.width={width}", f"data.min_frames={frames}",
                         "validation.prompts=[]", "data.image_dropout=0", *control)
    entries = prepare(config, variant, torch.device("cpu"), show_progress=False).entries
    batch = collate([LatentDataset(entries)[0]])
    transformer = load_transformer(path, variant)
    step, _, _ = assemble_step(Accelerator(cpu=True), transformer, config, variant,
                               load_scheduler(path, variant))
    generators = sample_generators(config.train.seed, 0, 0, 0, 1, torch.device("cpu"))
    return _kwargs_of_first_forward(transformer, lambda: step.forward_backward(batch, generators))


@pytest.mark.parametrize("frames,height,width", SIZES)
@pytest.mark.parametrize("short", [spec.short for spec in SPECS] + WIDENED)
def test_training_step_gives_the_transformer_what_the_stock_pipeline_gives_it(make_config, one_clip, short, frames,
                                                                              height, width):
    short, widened = short.removesuffix("+control"), short.endswith("+control")
    path = f"tiny://{short}"
    variant = load_variant(path, "fp32", control=widened)  # fp32 on both sides, so dtypes compare as they are
    if "control" in variant.conditions:
        if (frames, height, width) != SIZES[0]:
            pytest.skip("control models add channels, not positions: the rotary crop is checked for their base models")
        if variant.patch_size_t > 1:
            frames += 4  # the control pipeline pads no latent frame: 8k+5 frames, an even latent count
    if variant.fixed_clip and (frames, height, width) != (9, 64, 96):  # 5B-I2V: one size, refused on both sides
        with pytest.raises(ValueError, match="not possible to generate videos at a different resolution"):
            _stock_inputs(path, variant, frames, height, width)
        with pytest.raises(ConfigError, match="learned position table"):
            variant.check_clip_size(frames, height, width)
        return
    stock = _stock_inputs(path, variant, frames, height, width)
    ours = _training_inputs(make_config, path, variant, frames, height, width, one_clip)
    assert _layout(ours) == _layout(stock)
    # [B, F, C, H, W] after the permute, F padded to a multiple of patch_size_t as the pipeline pads it (1.5)
    assert ours["hidden_states"].shape[1] == stock["hidden_states"].shape[1] == variant.padded_latent_frames(frames)
    assert ours["timestep"].dtype == torch.int64
    if "image" in variant.conditions:
        _assert_same_image_latents(variant, ours, stock)
        assert (stock.get("ofs") is not None) == (variant.spec.ofs is not None)
        if variant.spec.ofs is not None:
            torch.testing.assert_close(ours["ofs"], stock["ofs"][:1], rtol=0, atol=0)  # 2.0 for 1.5-I2V
    if "control" in variant.conditions:  # the same control latents: channel order, scale and frames
        channels = variant.latent_channels
        torch.testing.assert_close(ours["hidden_states"][:, :, channels:], stock["hidden_states"][:1, :, channels:],
                                   rtol=1e-3, atol=1e-3)  # 0.7 against 1.15, or the video's channels: far off
    if variant.use_rotary:  # the same 3D RoPE values, not only the same shapes
        for a, b in zip(ours["image_rotary_emb"], stock["image_rotary_emb"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        assert ours.get("image_rotary_emb") is None and stock.get("image_rotary_emb") is None


def _assert_same_image_latents(variant, ours: dict, stock: dict) -> None:
    """The image channels: the image at latent frame 0, zeros after it (padded frames included), at the scale the
    stock pipeline gives it. Both sides sample the same image's latent distribution (ours under the recipe's small
    pixel noise), so their sizes agree; scaled the other way (x0.7 against /0.7) they would differ 2x."""
    channels = variant.configs.vae["latent_channels"]
    mine, theirs = ours["hidden_states"][:, :, channels:], stock["hidden_states"][:1, :, channels:]
    assert mine.shape == theirs.shape
    for image in (mine, theirs):
        assert image[:, 0].abs().sum() > 0 and not image[:, 1:].any()
    ratio = (mine[:, 0].norm() / theirs[:, 0].norm()).item()
    assert 0.85 < ratio < 1.18, ratio


@pytest.mark.parametrize("short,name,hub_id", [(s.short, s.name, s.hub_id) for s in SPECS])
def test_variants_are_read_from_the_configs_not_the_name(tmp_path, short, name, hub_id):
    folder = shutil.copytree(resolve_model_path(f"tiny://{short}"), tmp_path / "renamed-to-nothing-useful")
    assert load_variant(str(folder)).name == name
    assert load_variant(hub_id).name == name  # built-in configs: no download
    assert load_variant(hub_id.lower().replace("thudm", "zai-org")).name == name


# 8: image channels on a text-to-video pipeline (an I2V transformer in a CogVideoXPipeline folder)
@pytest.mark.parametrize("in_channels,said", [(8, "a combination no registered variant matches"),
                                              (12, "neither 1x nor 2x")])
def test_an_unsupported_pipeline_is_refused_at_load_with_what_was_found(tmp_path, make_config, capsys, in_channels,
                                                                         said):
    folder = shutil.copytree(resolve_model_path("tiny://5b"), tmp_path / "pipeline")
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "in_channels": in_channels}))
    with pytest.raises(UnsupportedModelError, match=said) as error:
        load_variant(str(folder))
    assert f"in_channels {in_channels}" in str(error.value) and "cogvideox-2b" in str(error.value)

    run = tmp_path / "run"
    code = main(["train", "--config", "configs/tiny-lora.yaml", f"model.path={folder}", f"output_dir={run}",
                 "tracking.report_to=none", f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cogft train: error: model.path" in err and said in err and "Supported: cogvideox-2b" in err
    assert not (tmp_path / "cache").exists()  # refused before any clip was encoded


def test_offered_names_only(tmp_path):
    with pytest.raises(ConfigError, match="tiny://nope: not offered; choose one of tiny://2b, tiny://5b, "
                                          "tiny://5b-i2v, tiny://1.5-5b, tiny://1.5-5b-i2v, tiny://fun-2b-control"):
        resolve_model_path("tiny://nope")
    with pytest.raises(ConfigError,
                       match="random://2b, random://5b, random://5b-i2v, random://1.5-5b, random://1.5-5b-i2v"):
        load_variant("random://xl")


@pytest.mark.parametrize("path,said", [
    ("/no/such/folder", "no such folder, and not a hub id"),
    ("someone/not-in-the-offline-cache", "cannot read model_index.json from the hub"),
])
def test_a_model_path_that_cannot_be_read_is_a_named_error(tmp_path, capsys, path, said):
    code = main(["prepare", "--config", "configs/tiny-lora.yaml", f"model.path={path}", f"output_dir={tmp_path}"])
    assert code == 2 and f"cogft prepare: error: model.path {path}: {said}" in capsys.readouterr().err


def test_random_pipelines_have_the_real_configs_without_building_anything(cogft_home):
    for spec in SPECS:
        configs = pipeline_configs(f"random://{spec.short}")
        assert configs == spec.reference and spec.matches(configs)
    assert not (cogft_home / "random").exists()


def test_token_counts_follow_the_configs_including_patch_size_t():
    two_b = load_variant("THUDM/CogVideoX-2b")
    assert two_b.tokens(49, 480, 720) == 226 + 13 * 30 * 45 == 17_776
    one_five = load_variant("THUDM/CogVideoX1.5-5B")  # 21 latent frames padded to 22, patched in pairs
    assert one_five.name == "cogvideox1.5-5b" and one_five.padded_latent_frames(81) == 22
    assert one_five.tokens(81, 768, 1360) == 226 + 11 * 48 * 85 == 45_106
    assert not spec_named("5b", "tiny://").matches(one_five.configs)  # a 1.5 pipeline is not taken for 5B


def test_the_clip_size_defaults_follow_the_variant(make_config, tmp_path):
    """1.5 trains 81 frames at 16 fps, 768x1360 unless the config says otherwise; what it says is kept."""
    from cogft.config_file import build_config
    from cogft.models.loading import load_for_config

    raw = {"model": {"path": "THUDM/CogVideoX1.5-5B"}, "data": {"path": "clips", "height": 480}, "output_dir": "run"}
    config, variant = load_for_config(build_config(raw))
    assert (config.data.num_frames, config.data.height, config.data.width, config.data.fps) == (81, 480, 1360, 16.0)
    raw["model"]["path"] = "THUDM/CogVideoX-2b"
    config, _ = load_for_config(build_config(raw))
    assert (config.data.num_frames, config.data.height, config.data.width, config.data.fps) == (49, 480, 720, 8.0)


def test_clip_sizes_the_variant_cannot_take_are_refused_by_key():
    variant = load_variant("THUDM/CogVideoX-2b")
    variant.check_clip_size(49, 480, 720)
    with pytest.raises(ConfigError, match="data.width=728: cogvideox-2b needs a multiple of 16"):
        variant.check_clip_size(49, 480, 728)


def test_a_cogvideox_1_5_lora_samples_whole_videos_and_loads_into_the_stock_pipeline(make_config, tmp_path):
    """The padded front frame is dropped before decoding (9 frames in, 9 out), and the exported LoRA changes a
    stock `CogVideoXPipeline`'s output in a process without cogft."""
    import os
    import subprocess
    import sys

    import decord

    from cogft.inference.sampling import sample
    from cogft.training.loop import train
    from test_train import STOCK_LOAD

    run = train(make_config("model.path=tiny://1.5-5b", "validation.prompts=[]", "train.max_steps=3",
                            "train.learning_rate=1e-2", "lora.rank=4", "lora.alpha=8"))
    video = decord.VideoReader(str(sample(str(run), "a red square", str(tmp_path / "s.mp4"), steps=2)))
    assert len(video) == 9 and video[0].shape == (64, 96, 3)
    result = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, resolve_model_path("tiny://1.5-5b"), str(run / "lora")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, cwd="/",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    scaling, change = map(float, result.stdout.split()[-2:])
    assert scaling == pytest.approx(8 / 4) and change > 1e-4
