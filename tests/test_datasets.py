"""Datasets as people have them: resolution buckets, still images beside clips, trigger words, Hub dataset repos."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from cogft.config import ConfigError, auto_sizes
from cogft.data.doctor import diagnose
from cogft.data.sources import DatasetLayoutError, read_dataset
from cogft.training.loop import train

REPO = Path(__file__).resolve().parent.parent
BUCKETS = "data.buckets=[64x96, 96x64, 80x80]"
FAST = ["validation.prompts=[]", "train.checkpoint_every=100", "data.min_frames=9"]


def report_summary(run: Path) -> dict:
    return json.loads((run / "prepare_report.jsonl").read_text().splitlines()[-1])["summary"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Landscape, portrait and square clips (two each) and three still images, each with a caption beside it."""
    import imageio_ffmpeg

    folder = tmp_path_factory.mktemp("mixed")
    ffmpeg = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi"]
    shapes = {"landscape": "160x120", "portrait": "120x160", "square": "128x128"}
    for shape, size in shapes.items():
        for n, source in enumerate(("testsrc2", "mandelbrot")):
            name = f"{shape}_{n}"
            subprocess.run([*ffmpeg, "-i", f"{source}=size={size}:rate=8", "-t", "1.5", "-pix_fmt", "yuv420p",
                            "-c:v", "libx264", "-preset", "ultrafast", str(folder / f"{name}.mp4")], check=True)
            (folder / f"{name}.txt").write_text(f"a {shape} clip number {n}")
    rng = np.random.default_rng(0)
    for name, (h, w) in (("photo_wide.png", (100, 150)), ("photo_tall.jpg", (150, 100)),
                         ("photo_tall2.webp", (140, 90))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"a still photo {Path(name).stem}")
    return folder


def test_auto_buckets_keep_the_area_and_cover_portrait_and_square():
    sizes = auto_sizes(480, 720)
    assert sizes[0] == (480, 720) and (720, 480) in sizes
    assert all(h % 16 == 0 and w % 16 == 0 and abs(h * w / 345_600 - 1) < 0.1 for h, w in sizes)
    assert any(abs(h / w - 1) < 0.05 for h, w in sizes)


def test_bucket_and_validation_size_keys_are_checked_by_name(make_config):
    from cogft.models.loading import load_for_config

    with pytest.raises(ConfigError, match=r"data.buckets\[1\]=480x721: cogvideox-2b needs multiples of 16"):
        load_for_config(make_config("data.buckets=[480x720, 480x721]"))
    with pytest.raises(ConfigError, match="data.buckets: .*more than once"):
        make_config("data.buckets=[64x96, 64x96]")
    with pytest.raises(ConfigError, match="validation.sizes has 1 entries for 2 validation.prompts"):
        make_config("validation.sizes=[64x96]")
    with pytest.raises(ConfigError, match=r"data.buckets\[1\]=96x64: cogvideox-5b-i2v takes only 64x96"):
        from cogft.models.loading import load_for_config

        load_for_config(make_config("model.path=tiny://5b-i2v", "data.buckets=[64x96, 96x64]",
                                    "validation.prompts=[]"))


def test_mixed_folder_trains_in_buckets_and_resumes_bit_exactly(make_config, mixed):
    """Clips of three shapes and still images, 2 per batch (3 per image batch), on a rotary model: each lands in
    the bucket nearest its shape, every batch holds one bucket, and 2 steps + resume to 6 == 6 straight."""
    common = [f"data.path={mixed}", "model.path=tiny://5b", BUCKETS, "train.batch_size=2", "data.image_batch_size=3",
              *FAST]
    straight = train(make_config(*common, "train.max_steps=6", out="straight"))
    summary = report_summary(straight)
    assert summary["sizes"] == {"64x96": 3, "96x64": 4, "80x80": 2} and summary["images"] == 3
    assert summary["buckets"] == {"9": 6, "1": 3}
    report = (straight / "prepare_report.jsonl").read_text().splitlines()
    rows = {Path(r["clip"]).name: r for r in map(json.loads, report) if "clip" in r}
    assert rows["portrait_0.mp4"]["size"] == "96x64" and rows["photo_wide.png"]["size"] == "64x96"
    assert rows["photo_tall.jpg"]["frames"] == 1 and rows["square_1.mp4"]["size"] == "80x80"

    first = train(make_config(*common, "train.max_steps=2", out="resumed"))
    assert (first / "checkpoints" / "step-000002").is_dir()
    resumed = train(make_config(*common, "train.max_steps=6", out="resumed"))
    assert len(losses(straight)) == 6 and losses(straight) == losses(resumed)


def test_batches_hold_one_bucket_with_the_image_batch_size(make_config, mixed):
    import torch

    from cogft.data.buckets import BucketBatchSampler, still_batch_sizes
    from cogft.data.cache import prepare
    from cogft.data.dataset import LatentDataset
    from cogft.models.loading import load_for_config

    config, variant = load_for_config(make_config(f"data.path={mixed}", BUCKETS, *FAST))
    entries = prepare(config, variant, torch.device("cpu"), show_progress=False).entries
    dataset = LatentDataset(entries)
    sampler = BucketBatchSampler(dataset.buckets, 2, seed=1, batch_sizes=still_batch_sizes(dataset.buckets, 3))
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(entries)))  # each once: a short batch is not filled
    for batch in batches:
        shapes = {tuple(dataset[i]["latent_mean"].shape) for i in batch}
        assert len(shapes) == 1
        assert len(batch) <= (3 if next(iter(shapes))[1] == 1 else 2)
    assert sorted(map(len, batches)) == [1, 2, 2, 2, 2]  # images: one alone at 64x96, two at 96x64


def test_adding_a_bucket_keeps_the_other_buckets_cached(make_config, mixed, tmp_path):
    import torch

    from cogft.data.cache import prepare
    from cogft.models.loading import load_for_config

    def run(buckets: str) -> dict:
        config, variant = load_for_config(make_config(f"data.path={mixed}", f"data.cache_dir={tmp_path / 'c'}",
                                                      buckets, *FAST))
        return prepare(config, variant, torch.device("cpu"), show_progress=False).summary

    first = run("data.buckets=[64x96, 96x64]")
    assert first["encoded"] == 9
    second = run(BUCKETS)
    assert second["cached"] == 7 and second["encoded"] == 2  # only the square clips move to the new bucket
    assert second["sizes"]["80x80"] == 2


def test_validation_renders_each_prompt_at_its_size(make_config, mixed):
    run = train(make_config(f"data.path={mixed}", BUCKETS, "train.max_steps=1", "train.checkpoint_every=100",
                            "data.min_frames=9", "validation.prompts=[a tall one, a default one]",
                            "validation.sizes=[96x64, 80x80]", "validation.num_inference_steps=1"))
    tall, square = sorted((run / "samples").glob("*.mp4"))
    assert iio.imread(tall, index=0).shape[:2] == (96, 64)
    assert iio.imread(square, index=0).shape[:2] == (80, 80)


def test_still_images_are_refused_by_name_where_the_model_cannot_train_one_frame(make_config, mixed, tmp_path):
    (tmp_path / "set").mkdir()
    for name in ("landscape_0.mp4", "landscape_0.txt", "photo_wide.png", "photo_wide.txt"):
        (tmp_path / "set" / name).write_bytes((mixed / name).read_bytes())
    config = tmp_path / "i2v.yaml"
    data = {"path": str(tmp_path / "set"), "num_frames": 9, "fps": 8, "height": 64, "width": 96}
    config.write_text(json.dumps({"model": {"path": "tiny://1.5-5b-i2v"}, "data": data,
                                  "output_dir": str(tmp_path / "run")}))
    report = diagnose(config)
    verdicts = {Path(r["clip"]).name: r for r in report["files"]}
    assert verdicts["landscape_0.mp4"]["verdict"] == "ok"
    problem = verdicts["photo_wide.png"]["problems"][0]
    assert problem["code"] == "still_unsupported" and "cogvideox1.5-5b-i2v" in problem["detail"]


def test_doctor_counts_buckets_images_trigger_words_and_far_sizes(make_config, mixed, tmp_path):
    lines = [{"video": f"{shape}_0.mp4", "caption": caption, "id_token": "zxq"}
             for shape, caption in (("landscape", "zxq, a wide clip"), ("portrait", "a tall clip"))]
    metadata = tmp_path / "meta.jsonl"
    metadata.write_text("".join(json.dumps(line) + "\n" for line in lines))
    for name in ("landscape_0.mp4", "portrait_0.mp4"):
        (tmp_path / name).write_bytes((mixed / name).read_bytes())
    config = make_config(f"data.path={metadata}", "data.caption_prefix=in the sks style,", BUCKETS, *FAST)
    captions = [clip.caption for clip in read_dataset(config.data)]
    assert captions == ["in the sks style, zxq, a wide clip", "in the sks style, zxq a tall clip"]

    config_file = tmp_path / "c.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))
    report = diagnose(config_file)
    assert report["sizes"] == {"64x96": 1, "96x64": 1} and report["images"] == 0
    assert report["trigger"] == {"trigger_words": ["in the sks style,", "zxq"], "captions_given_it": 2,
                                 "captions_already_with_it": 0}
    assert any("of the pixels of cogvideox-2b's native 480x720" in note for note in report["far_from_native"])
    folder = diagnose(mixed)
    # no config: the schema's one size and 49 frames, which the 1.5 s clips do not fill; stills need no length
    assert folder["images"] == 3 and folder["sizes"] == {"480x720": 3} and folder["problems"] == {"too_short": 6}
    wide = next(row for row in folder["files"] if row["clip"].endswith("photo_wide.png"))
    assert any(note.startswith("far below the training size: scaled up 4.8x") for note in wide["notes"])


def hub_snapshot(cache: Path, repo: str, revision: str, files: dict[str, bytes]) -> Path:
    """A dataset repo as huggingface_hub caches it: refs/REVISION naming a commit, and that commit's snapshot."""
    commit = f"{abs(hash((repo, revision))):040d}"[:40]
    root = cache / f"datasets--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    for name, data in files.items():
        (root / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "snapshots" / commit / name).write_bytes(data)
    return root / "snapshots" / commit


def test_hub_dataset_is_read_from_the_local_cache(make_config, mixed, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    clip = (mixed / "landscape_0.mp4").read_bytes()
    rows = "file_name,caption\nclips/a.mp4,a wide clip\nclips/b.mp4,another wide clip\n"
    hub_snapshot(cache, "me/clips", "main", {"metadata.csv": rows.encode(), "clips/a.mp4": clip,
                                             "clips/b.mp4": clip[:-1] + b"\0"})
    hub_snapshot(cache, "me/clips", "v2", {"train/videos.txt": b"x.mp4\n", "train/prompts.txt": b"a prompt\n",
                                           "train/x.mp4": clip})
    config = make_config("data.path=hf://datasets/me/clips")
    clips = read_dataset(config.data)
    assert [c.caption for c in clips] == ["a wide clip", "another wide clip"]
    assert clips[0].video.read_bytes() == clip
    v2 = read_dataset(make_config("data.path=hf://datasets/me/clips@v2/train").data)
    assert [c.caption for c in v2] == ["a prompt"]

    with pytest.raises(DatasetLayoutError, match="me/missing is not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        read_dataset(make_config("data.path=hf://datasets/me/missing").data)
    with pytest.raises(DatasetLayoutError, match="has no 'nope'"):
        read_dataset(make_config("data.path=hf://datasets/me/clips/nope").data)
    with pytest.raises(DatasetLayoutError, match="write hf://datasets/OWNER/NAME"):
        read_dataset(make_config("data.path=hf://models/me/clips").data)

    import torch

    from cogft.data.cache import prepare
    from cogft.models.loading import load_for_config

    config, variant = load_for_config(make_config("data.path=hf://datasets/me/clips",
                                                  f"data.cache_dir={tmp_path / 'c'}"))
    summary = prepare(config, variant, torch.device("cpu"), show_progress=False).summary
    assert summary["kept"] == summary["encoded"] == 2  # offline (conftest sets HF_HUB_OFFLINE=1), from the cache
