"""The motion guard: base renders once per run, `quality/motion_ratio` at every validation, the warning."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import cogft.training.validation as validation
from cogft.config import ConfigError
from cogft.config_file import load_config
from cogft.training.loop import Trainer, train
from cogft.training.metric_rows import logged_rows
from cogft.training.motion import RATIO, check_motion_guard, motion, still_images
from cogft.training.summary import run_summary
from motion_experiment import PANS

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red square bouncing across a blue background"


def _config(out: Path, cache: Path, *overrides: str, data: Path = REPO / "data"):
    return load_config(REPO / "configs" / "tiny-lora.yaml", [
        f"data.path={data}", f"data.cache_dir={cache}", f"output_dir={out}", "tracking.report_to=none",
        f"validation.prompts=[{PROMPT}]", "validation.num_inference_steps=2", *overrides])


def _ratios(run: Path) -> list[tuple[int, float]]:
    return [(row["step"], row[RATIO]) for row in logged_rows(run) if RATIO in row]


def _adapter_off_flag(monkeypatch) -> list[bool]:
    """A flag that is [True] while validation renders with the adapter switched off."""
    off, real_disabled = [False], validation.adapter_disabled

    @contextlib.contextmanager
    def disabled(model):
        with real_disabled(model):
            off[0] = True
            try:
                yield
            finally:
                off[0] = False

    monkeypatch.setattr(validation, "adapter_disabled", disabled)
    return off


@contextlib.contextmanager
def _counting_base_renders(monkeypatch):
    """Counts the validation renders made with the adapter switched off."""
    counts, off, real_render = [0], _adapter_off_flag(monkeypatch), validation.render

    def render(*args, **kwargs):
        counts[0] += off[0]
        return real_render(*args, **kwargs)

    monkeypatch.setattr(validation, "render", render)
    yield counts


def _pan(speed: float, frames: int = 9, flicker: float = 0.0) -> np.ndarray:
    """A smooth random texture panned `speed` pixels a frame (bilinear shifts), optionally flickering in brightness."""
    rng = np.random.default_rng(0)
    texture = rng.random((80, 200))
    texture = (texture + np.roll(texture, 1, 0) + np.roll(texture, 1, 1) + np.roll(texture, (1, 1), (0, 1))) / 4
    video = []
    for t in range(frames):
        x = t * speed
        whole, part = int(x), x - int(x)
        frame = (1 - part) * texture[:64, whole:whole + 96] + part * texture[:64, whole + 1:whole + 97]
        video.append(np.clip(frame * (1 + flicker * (-1) ** t), 0, 1))
    return np.repeat(np.stack(video)[..., None], 3, -1).astype(np.float32)


def test_flow_reads_a_pan_by_its_speed_and_a_flicker_as_none():
    """Why optical flow and not the mean frame-to-frame change: a 20 % flicker of a still frame changes the pixels
    more than a 1-pixel pan does, but does not move anything."""
    assert motion(_pan(0)) < 0.01 and motion(_pan(1)[:1]) == 0.0
    for speed in (1, 2, 4):
        assert motion(_pan(speed)) == pytest.approx(speed, rel=0.15)
    flicker = _pan(0, flicker=0.2)
    assert motion(flicker) < 0.1
    change = float(np.abs(np.diff(flicker, axis=0)).mean()), float(np.abs(np.diff(_pan(1), axis=0)).mean())
    assert change[0] > change[1]  # the frame-to-frame change would call the flicker more motion than the pan


def test_a_lora_with_no_effect_moves_exactly_like_the_base_at_every_validation(tmp_path, shared_cache, monkeypatch):
    """Before training the adapter's output is zero: its videos are the base's, so the ratio is exactly 1 at each
    validation, and the base is rendered at the first only."""
    with _counting_base_renders(monkeypatch) as base_renders:
        trainer = Trainer(_config(tmp_path / "fresh", shared_cache))
        try:
            trainer.setup()
            trainer.validate(1)
            trainer.validate(2)
        finally:
            trainer.accelerator.end_training()
            trainer.hold.release()
    assert base_renders[0] == 1
    assert _ratios(tmp_path / "fresh") == [(1, 1.0), (2, 1.0)]
    row = [row for row in logged_rows(tmp_path / "fresh") if RATIO in row][0]
    assert row["quality/motion"] == row["quality/motion_base"] > 0 and row[f"{RATIO}/00"] == 1.0
    base = tmp_path / "fresh" / "samples" / "base"
    assert (base / "step-000000-00-a-red-square-bouncing-across-a-blue-back.mp4").is_file()
    assert json.loads((base / "motion.json").read_text())["renders"]["0"]["motion"] == row["quality/motion_base"]


def test_the_base_is_rendered_once_per_run_and_again_only_when_its_settings_change(tmp_path, shared_cache,
                                                                                  monkeypatch):
    run = tmp_path / "run"
    common = ("train.checkpoint_every=1", "validation.every=1")
    with _counting_base_renders(monkeypatch) as base_renders:
        train(_config(run, shared_cache, "train.max_steps=2", *common))
        assert base_renders[0] == 1  # at step 1's validation; step 2's (the last) measured against it
        recorded = (run / "samples" / "base" / "motion.json").read_text()
        train(_config(run, shared_cache, "train.max_steps=3", *common))  # resumed from step 2
        assert base_renders[0] == 1
        assert (run / "samples" / "base" / "motion.json").read_text() == recorded
        train(_config(run, shared_cache, "train.max_steps=4", "validation.seed=7", *common))
        assert base_renders[0] == 2  # another seed: another base video
    assert [step for step, _ in _ratios(run)] == [1, 2, 3, 4]
    assert all(ratio > 0 for _, ratio in _ratios(run))


def test_a_lora_whose_videos_stand_still_is_warned_about_with_the_count_of_stills(tmp_path, shared_cache,
                                                                                 monkeypatch):
    """The renders replaced by a pan (adapter off) and the same frame held (adapter on): ratio ~0, and the summary and
    report warn, counting the data's still images."""
    data = tmp_path / "data"
    data.mkdir()
    names = (REPO / "data" / "videos.txt").read_text().splitlines()[:2]
    captions = (REPO / "data" / "prompts.txt").read_text().splitlines()[:2]
    (data / "videos.txt").write_text("\n".join([*(str(REPO / "data" / n) for n in names),
                                                str(REPO / "data" / "images" / "bouncing_square.jpg")]))
    (data / "prompts.txt").write_text("\n".join([*captions, captions[0]]))
    off = _adapter_off_flag(monkeypatch)
    monkeypatch.setattr(validation, "render", lambda *args, **kwargs: _pan(2) if off[0] else _pan(0))
    config = _config(tmp_path / "run", shared_cache, "train.max_steps=1", "train.batch_size=1",
                     "data.image_batch_size=1", data=data)
    run = train(config)
    [(step, ratio)] = _ratios(run)
    assert step == 1 and ratio < 0.01
    summary = run_summary(config, run, stopped=False)
    assert "WARNING: the LoRA freezes motion" in summary and "1 still images of 3 samples" in summary
    assert "the LoRA freezes motion" in (run / "report.html").read_text()
    assert "WARNING" not in run_summary(config.model_copy(update={"quality": config.quality.model_copy(
        update={"min_motion_ratio": 0.0})}), run, stopped=False)


def test_without_opencv_the_guard_is_refused_by_key_before_any_work(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ConfigError, match=r"quality\.motion.*opencv-python-headless.*quality\.motion=false"):
        check_motion_guard(make_config())
    check_motion_guard(make_config("quality.motion=false"))
    check_motion_guard(make_config("train.mode=sft"))  # no adapter: no guard


def test_bench_times_a_validation_with_and_without_the_guard(make_config):
    from cogft.bench.validation import bench_validation

    rows = bench_validation(make_config("validation.prompts=[a red square]", "validation.num_inference_steps=2",
                                        "train.batch_size=1"), warmup=0, steps=1, emit=lambda row: None)
    assert [row.get("variant", row["figure"]) for row in rows] == [
        "today", "first_with_base_renders", "with_measures", "motion_measure_s", "motion_guard_share"]
    assert all(row["value"] > 0 for row in rows[:4])
    share = rows[-1]
    assert share["validations"] == 2 and share["s_per_step"] > 0  # 60 steps, every 30


@pytest.fixture(scope="module")
def moving_model(tmp_path_factory, cogft_home) -> tuple[Path, Path, Path]:
    """The tiny 2B that can show motion (tests/motion_experiment.py), two panning clips, and their middle frames."""
    from cogft.models.build import resolve_built
    from motion_experiment import build_moving_model, write_pans

    folder = tmp_path_factory.mktemp("moving")
    return build_moving_model(Path(resolve_built("tiny://2b")), folder / "model"), *write_pans(folder / "data")


def _base_that_moves(model: Path, clips: Path, out: Path, common: list[str]) -> Path:
    """The model fine-tuned whole on the clips (300 steps), as a pipeline folder: a base whose videos move."""
    run = train(load_config(REPO / "configs" / "tiny-sft.yaml", [
        f"model.path={model}", f"data.path={clips}", f"output_dir={out / 'run'}", "validation.prompts=[]",
        "train.learning_rate=3e-3", "train.max_steps=300", "train.checkpoint_every=300", *common]))
    shutil.copytree(model, out / "model", ignore=shutil.ignore_patterns("transformer"))
    shutil.copytree(run / "transformer", out / "model" / "transformer")
    return out / "model"


def test_a_lora_trained_on_stills_of_the_clips_freezes_their_motion(moving_model, tmp_path, shared_cache):
    """On a base that renders two panning clips moving, a LoRA trained on the clips' middle frames as stills (one-frame
    samples) renders the patterns standing still: the ratio is below 1 at every validation; a LoRA trained on the
    clips, the same steps and seed, keeps them moving. Everything trains at the noisiest timesteps and renders in one
    sampling step, where the tiny model learns what the clips look like and how they move (docs/quality.md)."""
    model, clips, stills = moving_model
    common = [f"data.cache_dir={shared_cache}", "tracking.report_to=none", "train.min_timestep=990"]
    base = _base_that_moves(model, clips, tmp_path / "base", common)
    ratios, rows = {}, {}
    for kind, data in (("clips", clips), ("stills", stills)):
        run = train(load_config(REPO / "configs" / "tiny-lora.yaml", [
            f"model.path={base}", f"data.path={data}", f"output_dir={tmp_path / kind}", *common,
            f"validation.prompts=[{', '.join(caption for *_, caption in PANS.values())}]",
            "validation.num_inference_steps=1", "validation.guidance_scale=1", "validation.every=50",
            "train.learning_rate=1e-2", "train.max_steps=100", "train.checkpoint_every=100"]))
        ratios[kind], rows[kind] = _ratios(run), [row for row in logged_rows(run) if RATIO in row]
    assert still_images(tmp_path / "stills") == (2, 2) and still_images(tmp_path / "clips") == (0, 2)
    assert [step for step, _ in ratios["clips"]] == [step for step, _ in ratios["stills"]] == [50, 100]
    assert rows["stills"][0]["quality/motion_base"] > 0.3  # px/frame: the base's videos move
    assert all(ratio < 0.85 for _, ratio in ratios["stills"])  # measured 0.28-0.68
    assert ratios["clips"][-1][1] > ratios["stills"][-1][1] + 0.3  # measured 0.52-0.91 apart
