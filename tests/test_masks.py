"""Loss masks, the data side: `masks.txt` and a mask column, a still or a video mask read as its clip is and mapped
onto the latent grid by the family, cached content-hashed; a masked run trains and resumes exactly, a black mask
makes its clip's loss exactly zero, and bad masks skip their clips with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cogft.cli import main
from cogft.config import ConfigError
from cogft.data.dataset import collate
from cogft.data.masks import check_masks
from cogft.data.sources import DatasetLayoutError, read_clips
from cogft.models.family import LOSS_MASK
from cogft.models.loading import load_variant
from cogft.training.loop import train
from test_train import losses

REPO = Path(__file__).resolve().parent.parent
VIDEOS = REPO / "data" / "videos"
FAST = ["validation.prompts=[]", "train.checkpoint_every=100"]


def _left_white(path: Path, width: int = 96, height: int = 64, flip: bool = False) -> Path:
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, : width // 2] = 255
    if flip:
        pixels = 255 - pixels
    Image.fromarray(pixels, "L").save(path)
    return path


def _mask_video(path: Path, white_frames: int, frames: int = 16, width: int = 96, height: int = 64) -> Path:
    """An 8 fps video (data.fps of the tiny config) whose first `white_frames` frames are white on their left half."""
    from imageio_ffmpeg import write_frames

    writer = write_frames(str(path), (width, height), fps=8, codec="libx264", pix_fmt_out="yuv444p",
                          output_params=["-qp", "0"], macro_block_size=1)
    writer.send(None)
    for i in range(frames):
        frame = np.zeros((height, width, 3), dtype=np.uint8)
        if i < white_frames:
            frame[:, : width // 2] = 255
        writer.send(frame.tobytes())
    writer.close()
    return path


def _folder(tmp_path: Path, pairs: list[tuple[str, str]]) -> Path:
    """A videos.txt + prompts.txt + masks.txt folder of sample clips, one caption each."""
    folder = tmp_path / "clips"
    folder.mkdir(exist_ok=True)
    for clip, _ in pairs:
        if not (folder / clip).exists():
            shutil.copy(VIDEOS / clip, folder)
    (folder / "videos.txt").write_text("".join(f"{clip}\n" for clip, _ in pairs))
    (folder / "prompts.txt").write_text("".join(f"clip {i}\n" for i in range(len(pairs))))
    (folder / "masks.txt").write_text("".join(f"{mask}\n" for _, mask in pairs))
    return folder


def _prepare(folder: Path, tmp_path: Path, *overrides: str) -> list[dict]:
    run = tmp_path / "run"
    assert main(["prepare", "--config", "configs/tiny-lora.yaml", f"data.path={folder}", f"output_dir={run}",
                 f"data.cache_dir={tmp_path / 'cache'}", "validation.prompts=[]", *overrides]) == 0
    return [json.loads(line) for line in (run / "prepare_report.jsonl").read_text().splitlines()]


def _entry(row: dict, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The cache entry of a report row's clip (the only entry of a run whose cache holds one clip per key)."""
    from cogft.config_file import load_config
    from cogft.data.cache import Preparer
    from cogft.data.sources import Clip

    config = load_config(REPO / "configs" / "tiny-lora.yaml", [f"data.cache_dir={tmp_path / 'cache'}"])
    variant = load_variant(config.model.path)
    preparer = Preparer(variant.resolve(config), variant, torch.device("cpu"))
    clip = Clip(Path(row["clip"]), "", "", mask=Path(row["mask"]) if row.get("mask") else None)
    return load_file(preparer.latent_path(preparer.clip_key(clip), row["frames"], (64, 96)))


def test_the_family_maps_a_pixel_mask_onto_its_latent_grid(tmp_path, capsys):
    """Space: the mean of each 8x8 cell; time: latent frame 0 is frame 0, latent frame k the mean of frames
    4k-3..4k. A family that maps no mask (the toy) is refused before any work."""
    variant = load_variant("tiny://2b")
    assert (variant.vae_scale_spatial, variant.vae_scale_temporal) == (8, 4)
    mask = torch.zeros(9, 64, 96)
    mask[:, :, :48] = torch.arange(9.0)[:, None, None] / 8  # frame f weighs f/8 on the left half
    mask[:, 0, 95] = 1.0                                     # one pixel of the top right cell
    latent = variant.loss_mask_latents(mask)
    assert latent.shape == (1, 3, 8, 12)
    expected = torch.tensor([0.0, (1 + 2 + 3 + 4) / 32, (5 + 6 + 7 + 8) / 32])
    assert torch.allclose(latent[0, :, :, :6], expected[:, None, None].expand(3, 8, 6))
    assert torch.equal(latent[0, :, 1:, 6:], torch.zeros(3, 7, 6)) and torch.equal(latent[0, :, 0, 6:11],
                                                                                       torch.zeros(3, 5))
    assert torch.allclose(latent[0, :, 0, 11], torch.full((3,), 1 / 64))
    assert variant.loss_mask_latents(torch.ones(1, 64, 96)).shape == (1, 1, 8, 12)  # a still image: one frame
    with pytest.raises(ValueError, match="does not map onto"):
        variant.loss_mask_latents(torch.ones(8, 64, 96))

    from cogft.data.sources import Clip
    from cogft.models import registry

    clips = [Clip(Path("a.mp4"), "a", "videos.txt:1"), Clip(Path("b.mp4"), "b", "videos.txt:2", mask=Path("m.png"))]
    check_masks(variant, clips, "data.path", "mask")  # CogVideoX maps them
    before = list(registry._FAMILIES)
    try:
        import toy_family

        toy = toy_family.TOY.bind(toy_family.TOY.tiny)
    finally:
        registry._FAMILIES[:] = before
    check_masks(toy, clips[:1], "data.path", "mask")  # no masks: nothing to refuse
    with pytest.raises(ConfigError, match=r"data.path: loss masks are listed for 1 of 2 clips .* masks need a "
                                          "family that maps them and toydit's does not"):
        check_masks(toy, clips, "data.path", "mask")
    registry.register_family(toy_family.FAMILY)  # and prepare refuses them before any work
    try:
        _left_white(tmp_path / "left.png")
        folder = _folder(tmp_path, [("bouncing_square.mp4", "../left.png")])
        code = main(["prepare", "--config", "configs/tiny-lora.yaml", "model.path=tiny://toy", f"data.path={folder}",
                     f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "validation.prompts=[]"])
    finally:
        registry._FAMILIES[:] = before
    assert code == 2 and "masks need a family that maps them" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "latents").exists()


def test_a_still_and_a_video_mask_are_cached_on_the_latent_grid_and_a_changed_mask_re_encodes(tmp_path):
    """A left-half white image weighs the left half of every latent frame 1 and the right 0; a mask video whose first
    3 frames (of the 9 a window takes) are white there gives latent frames 1, 1/2 and 0 (frame 0 alone, then frames
    1-4 and 5-8); a clip without a mask caches none."""
    _left_white(tmp_path / "left.png")
    _mask_video(tmp_path / "first3.mp4", white_frames=3)
    folder = _folder(tmp_path, [("bouncing_square.mp4", "../left.png"), ("fractal_zoom.mp4", "../first3.mp4"),
                                ("game_of_life.mp4", "")])
    rows = _prepare(folder, tmp_path)
    summary, rows = rows[-1]["summary"], rows[:-1]
    assert [row["status"] for row in rows] == ["encoded"] * 3 and summary["masks"] == 2
    assert [Path(row["mask"]).name if row["mask"] else None for row in rows] == ["left.png", "first3.mp4", None]
    still, video, plain = (_entry(row, tmp_path) for row in rows)
    assert LOSS_MASK not in plain
    assert still[LOSS_MASK].shape == (1, 3, 8, 12) == video[LOSS_MASK].shape and still[LOSS_MASK].dtype == torch.float32
    left = torch.zeros(1, 3, 8, 12)
    left[..., :6] = 1
    assert torch.equal(still[LOSS_MASK], left)
    over_time = left * torch.tensor([1.0, 0.5, 0.0])[None, :, None, None]
    assert torch.allclose(video[LOSS_MASK], over_time, atol=0.01)

    _left_white(tmp_path / "left.png", flip=True)  # the mask changed under the same name: its clip alone re-encodes
    again = _prepare(folder, tmp_path)[:-1]
    assert [row["status"] for row in again] == ["encoded", "cached", "cached"]
    assert torch.equal(_entry(again[0], tmp_path)[LOSS_MASK], 1 - left)


def test_bad_masks_skip_their_clips_with_the_reason_and_an_unpaired_list_is_refused(tmp_path):
    _left_white(tmp_path / "wide.png", width=160, height=64)
    _mask_video(tmp_path / "short.mp4", white_frames=1, frames=4)
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "notes.txt").write_text("not a mask\n")
    (tmp_path / "empty.png").write_bytes(b"")
    pairs = [("bouncing_square.mp4", "../wide.png"), ("fractal_zoom.mp4", "../short.mp4"),
             ("game_of_life.mp4", "../noise.mp4"), ("test_pattern.mp4", "../notes.txt"),
             ("rotating_gradient.mp4", "../missing.png"), ("wide_cellular.mp4", "../empty.png")]
    rows = _prepare(_folder(tmp_path, pairs), tmp_path)[:-1]
    found = {Path(row["clip"]).stem: row.get("problem") for row in rows}
    assert found == {"bouncing_square": "mask_mismatch", "fractal_zoom": "mask_too_short",
                     "game_of_life": "mask_unreadable", "test_pattern": "mask_unreadable",
                     "rotating_gradient": "mask_missing", "wide_cellular": "mask_unreadable"}
    assert all("mask" in row["reason"] for row in rows)
    from cogft.data.doctor import diagnose, format_table

    report = diagnose(tmp_path / "clips")  # doctor reads no pixels: it finds the masks that are not files
    assert {code: report["problems"].get(code) for code in ("mask_missing", "mask_unreadable")} == {
        "mask_missing": 1, "mask_unreadable": 1} and report["masks"] == 4
    assert [Path(row["mask"]).name for row in report["files"]][:2] == ["wide.png", "short.mp4"]
    assert "with a loss mask: 4" in format_table(report)
    with open(tmp_path / "clips" / "masks.txt", "a") as lines:
        lines.write("extra.png\n")
    with pytest.raises(DatasetLayoutError, match="masks.txt has 7 lines but videos.txt has 6"):
        read_clips(tmp_path / "clips")


def test_a_mask_column_names_each_clips_mask_and_a_wrong_one_is_refused(tmp_path):
    shutil.copy(VIDEOS / "bouncing_square.mp4", tmp_path)
    rows = [{"video": "bouncing_square.mp4", "caption": "a", "subject": "left.png"},
            {"video": "bouncing_square.mp4", "caption": "b", "subject": ""}]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    clips = read_clips(tmp_path / "list.jsonl", mask_column="subject", given_columns=("data.mask_column",))
    assert [clip.mask for clip in clips] == [tmp_path / "left.png", None]
    assert read_clips(tmp_path / "list.jsonl")[0].mask is None  # the default column, absent: no masks
    with pytest.raises(DatasetLayoutError, match="data.mask_column='matte': no line of .* has that column"):
        read_clips(tmp_path / "list.jsonl", mask_column="matte", given_columns=("data.mask_column",))


def test_collate_gives_an_unmasked_sample_of_a_masked_batch_ones():
    mask = torch.rand(1, 3, 8, 12)
    items = [{"latent_mean": torch.zeros(4, 3, 8, 12), LOSS_MASK: mask}, {"latent_mean": torch.ones(4, 3, 8, 12)}]
    batch = collate(items)
    assert torch.equal(batch[LOSS_MASK], torch.stack([mask, torch.ones_like(mask)]))
    assert LOSS_MASK not in collate([items[1], items[1]])


def _masked_data(tmp_path: Path) -> Path:
    """The sample clips with masks on some: a still, a video, and none (so batches mix masked and unmasked samples)."""
    _left_white(tmp_path / "left.png")
    _mask_video(tmp_path / "first3.mp4", white_frames=3, frames=24)
    clips = (REPO / "data" / "videos.txt").read_text().split()
    masks = ["../left.png", "", "../first3.mp4", "", "../left.png", ""]
    return _folder(tmp_path, [(Path(clip).name, mask) for clip, mask in zip(clips, masks)])


def test_a_masked_run_resumes_bit_exactly(make_config, tmp_path):
    data = f"data.path={_masked_data(tmp_path)}"
    straight = train(make_config(*FAST, data, "train.max_steps=4", out="straight"))
    train(make_config(*FAST, data, "train.max_steps=2", out="resumed"))
    resumed = train(make_config(*FAST, data, "train.max_steps=4", out="resumed"))
    assert losses(straight) == losses(resumed) and len(losses(resumed)) == 4
    a, b = (load_file(run / "lora" / "pytorch_lora_weights.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (resumed / "prepare_report.jsonl").read_text().splitlines()]
    assert rows[-1]["summary"]["masks"] == 3


def test_a_black_mask_makes_its_clips_loss_exactly_zero(make_config, tmp_path):
    """Two clips, one a step, two epochs: the clip under an all-black mask trains on a loss of exactly 0 (so no
    gradient: tests/test_objective_options.py), the other on its whole frame."""
    Image.new("L", (96, 64)).save(tmp_path / "black.png")
    data = _folder(tmp_path, [("bouncing_square.mp4", "../black.png"), ("fractal_zoom.mp4", "")])
    run = train(make_config(*FAST, f"data.path={data}", "train.max_steps=4", "train.batch_size=1"))
    assert sorted(losses(run))[:2] == [0.0, 0.0] and min(sorted(losses(run))[2:]) > 0


def test_a_cut_out_with_transparency_masks_by_its_alpha_and_an_opaque_one_by_its_grey(tmp_path):
    """A dark subject on a transparent background weighs the subject 1 (its grey would weigh it ~0); an RGBA image
    with no transparent pixel is read by its grey."""
    from cogft.data.masks import read_mask
    from cogft.data.video import ClipProbe, DecodeSpec, Selection

    clip = ClipProbe(info=SimpleNamespace(width=720, height=480), size=(64, 96),
                     selection=Selection(((0, 1), (2, 3)), (0, 2), 4, ()))
    spec = DecodeSpec((2,), 64, 96, 8.0)
    cut_out = np.zeros((64, 96, 4), dtype=np.uint8)
    cut_out[:, :48] = (20, 10, 5, 255)  # a dark subject on the left, the right transparent
    Image.fromarray(cut_out, "RGBA").save(tmp_path / "cut_out.png")
    opaque = np.full((64, 96, 4), 255, dtype=np.uint8)
    opaque[:, 48:, :3] = 0
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    for name in ("cut_out.png", "opaque.png"):
        windows = read_mask(str(tmp_path / name), clip, spec)
        assert len(windows) == 2 and windows[0].shape == (1, 64, 96)
        assert (windows[0][:, :, :48] == 255).all() and (windows[0][:, :, 48:] == 0).all(), name
