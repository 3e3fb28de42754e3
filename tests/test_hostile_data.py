"""Datasets from strangers (issue 26, classes 1-5): contained, checked by key, weighed once, decoded to their true
values, and never a traceback. Every hostile input is made here."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
from PIL import Image

from cogft.config import ConfigError
from cogft.data.buckets import BucketBatchSampler, still_batch_sizes
from cogft.data.checks import admission_problems, byte_duplicates
from cogft.data.errors import DatasetLayoutError
from cogft.data.images import decode_sample, open_upright
from cogft.data.sources import is_still, read_clips, read_dataset
from cogft.data.video import DecodeSpec

REPO = Path(__file__).resolve().parent.parent
CLIP = REPO / "data" / "videos" / "bouncing_square.mp4"
SPEC = DecodeSpec((9, 5), 32, 48, 8.0)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: what a decompression bomb shows Pillow first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def tiff_12bit(values: list[int]) -> bytes:
    """A one-row 12-bit grey TIFF (Pillow holds it as I;16 with values up to 4095), packed as cameras write it."""
    packed = int("".join(f"{v:012b}" for v in values) + "0" * (-12 * len(values) % 8), 2)
    data = packed.to_bytes(-(-12 * len(values) // 8), "big")
    tags = [(256, len(values)), (257, 1), (258, 12), (259, 1), (262, 1), (273, 8 + 2 + 9 * 12 + 4), (277, 1),
            (278, 1), (279, len(data))]
    entries = b"".join(struct.pack("<HHIHH", tag, 3, 1, value, 0) if tag not in (273, 279) else
                       struct.pack("<HHII", tag, 4, 1, value) for tag, value in tags)
    return b"II*\0" + struct.pack("<IH", 8, len(tags)) + entries + struct.pack("<I", 0) + data


def hub_repo(cache: Path, repo: str, revision: str, files: dict[str, bytes | Path]) -> Path:
    """A dataset repo as huggingface_hub caches it: each file a blob, linked from the revision's snapshot; a Path
    value is linked to as it is (a link the repo's author planted)."""
    root = cache / f"datasets--{repo.replace('/', '--')}"
    commit = f"{abs(hash((repo, revision))):040d}"[:40]
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    snapshot = root / "snapshots" / commit
    for name, data in files.items():
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            link.symlink_to(data)
            continue
        blob = root / "blobs" / f"{zlib.crc32(data):08x}{len(data)}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_class1_a_hub_dataset_cannot_reach_outside_its_snapshot(make_config, tmp_path, monkeypatch):
    """Relative escapes, absolute paths and links out of the snapshot are skipped as `outside_dataset` without
    being opened; files stored the Hub's way (links into the repo's blobs) are read."""
    from huggingface_hub import constants

    from cogft.data.doctor import diagnose

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    outside = tmp_path / "private.mp4"
    shutil.copy(CLIP, outside)
    (tmp_path / "secret.txt").write_text("the caption is a secret of this machine")
    clip = CLIP.read_bytes()
    rows = ["file_name,caption,image", "clips/a.mp4,inside,", f"{'../' * 12}etc/hostname,up and out,",
            f"{outside},absolute,", "clips/link.mp4,a link out,", "clips/a.mp4,an image outside,/etc/passwd"]
    hub_repo(cache, "me/evil", "main", {"metadata.csv": "\n".join(rows).encode(), "clips/a.mp4": clip,
                                        "clips/link.mp4": outside})
    hub_repo(cache, "me/evil", "v2", {"x.mp4": clip, "x.txt": tmp_path / "secret.txt"})

    clips = read_dataset(make_config("data.path=hf://datasets/me/evil").data)
    problems = admission_problems(clips, byte_duplicates(clips))
    codes = [[p.code for p in problems[c.line]] for c in clips]
    assert codes == [[], *[["outside_dataset"]] * 4], codes
    assert "symbolic link" in problems[clips[3].line][0].detail
    [folder_clip] = read_dataset(make_config("data.path=hf://datasets/me/evil@v2").data)
    assert folder_clip.refused[0] == "outside_dataset" and folder_clip.caption is None  # the secret is never read
    with pytest.raises(DatasetLayoutError, match="outside the dataset"):
        read_dataset(make_config("data.path=hf://datasets/me/evil/../../..").data)

    report = diagnose(REPO / "configs" / "tiny-lora.yaml", ["data.path=hf://datasets/me/evil", "data.decode_workers=1"],
                      workers=1)
    verdicts = [(row["verdict"], [p["code"] for p in row["problems"]], "source" in row) for row in report["files"]]
    assert verdicts == [("ok", [], True), *[("skip", ["outside_dataset"], False)] * 4]


def test_class2_keys_naming_a_column_or_a_file_are_checked_before_any_work(make_config, tmp_path, capsys):
    from cogft.cli import main

    good = REPO / "data" / "images" / "fractal_zoom.jpg"
    (tmp_path / "meta.csv").write_text(f"video,caption,Image\n{CLIP},a square,{good}\n")
    for column in ("image_file", "IMAGE"):
        with pytest.raises(DatasetLayoutError, match=rf"data.image_column='{column}': no row of .*meta.csv has that "
                                                     r"column \(columns: video, caption, Image\)"):
            read_dataset(make_config(f"data.path={tmp_path / 'meta.csv'}", f"data.image_column={column}").data)
    named = read_dataset(make_config(f"data.path={tmp_path / 'meta.csv'}", "data.image_column=Image").data)
    assert [c.image for c in named] == [good]
    with pytest.raises(DatasetLayoutError, match="data.image_column: .* is a videos.txt \\+ prompts.txt folder"):
        read_dataset(make_config("data.image_column=Image").data)  # the default data.path: data/, videos.txt
    with pytest.raises(ConfigError, match=r"data.cache_dir: .*meta.csv is a file, not a folder"):
        make_config(f"data.cache_dir={tmp_path / 'meta.csv' / 'cache'}")  # found at the first write, after the work

    (tmp_path / "bomb.png").write_bytes(png_header(30000, 30000))
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((8, 8), np.int32)).save(tmp_path / "int32.tif")
    for name, said in (("bomb.png", "too large to decode safely"), ("text.png", "UnidentifiedImageError"),
                       ("int32.tif", "32-bit integers")):
        code = main(["train", "--config", str(REPO / "configs" / "tiny-i2v-lora.yaml"),
                     f"output_dir={tmp_path / 'run'}", "tracking.report_to=none",
                     f"data.cache_dir={tmp_path / 'cache'}", f"validation.images=[{tmp_path / name}, {good}]"])
        err = capsys.readouterr().err
        assert code == 2 and f"validation.images: {tmp_path / name} cannot be used" in err and said in err, err
        assert not (tmp_path / "cache").exists()  # refused before prepare and the model load


def test_class3_every_sample_once_per_epoch_whatever_the_buckets_and_processes():
    """A clip alone in its bucket, 4 images under image_batch_size=64: each trains once an epoch, in an order that is
    a function of (seed, epoch) only, the same on every rank, sharded by accelerate without repeats."""
    buckets = [(9, 64, 96)] * 5 + [(9, 96, 64)] + [(1, 64, 96)] * 4
    sizes = still_batch_sizes(buckets, 64)
    one_process = list(BucketBatchSampler(buckets, 2, seed=7, batch_sizes=sizes))
    assert sorted(i for b in one_process for i in b) == list(range(len(buckets)))  # the lone clip once, not twice
    for processes in (1, 2, 3):
        sampler = BucketBatchSampler(buckets, 2, seed=7, batch_sizes=sizes, processes=processes)
        assert len(sampler) % processes == 0
        for epoch in range(3):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) and sorted(i for b in batches for i in b) == list(range(len(buckets)))
            assert all(len({buckets[i] for i in b}) == 1 for b in batches)
            again = BucketBatchSampler(buckets, 2, seed=7, batch_sizes=sizes, processes=processes)
            again.set_epoch(epoch)
            assert list(again) == batches and list(SkipBatchSampler(again, 2)) == batches[2:]  # what a resume skips to
            shards = [list(BatchSamplerShard(sampler, processes, rank)) for rank in range(processes)]
            assert len({len(shard) for shard in shards}) == 1  # every rank takes part in every step
            assert sorted(i for shard in shards for b in shard for i in b) == list(range(len(buckets)))
    assert BucketBatchSampler(buckets, 2, seed=7, batch_sizes=sizes).describe() == {
        "9x96x64": "1 in batches of 1", "9x64x96": "5 in batches of 2, 2, 1", "1x64x96": "4 in batches of 4"}
    with pytest.raises(DatasetLayoutError, match="3 samples cannot give each of 4 processes a batch"):
        BucketBatchSampler([(9, 64, 96)] * 3, 1, seed=0, processes=4)


def test_class4_every_image_mode_decodes_to_its_true_values_and_animations_are_clips(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 48), (32, 1))  # mean 0.5 in every encoding
    expected_grey = {"grey16.png": (ramp * 65535).astype(np.uint16), "grey8.png": np.round(ramp * 255).astype(np.uint8),
                     "float.tif": ramp.astype(np.float32)}
    for name, pixels in expected_grey.items():
        Image.fromarray(pixels).save(tmp_path / name)
    transparent = np.zeros((32, 48, 4), np.uint8)  # black under full transparency: shown as white
    Image.fromarray(transparent, "RGBA").save(tmp_path / "clear.png")
    Image.fromarray(transparent[..., [0, 3]], "LA").save(tmp_path / "clear_grey.png")
    Image.new("P", (48, 32), 0).save(tmp_path / "clear_palette.png", transparency=0)
    Image.new("CMYK", (48, 32), (0, 0, 0, 255)).save(tmp_path / "black.jpg")
    Image.new("1", (48, 32), 1).save(tmp_path / "white.bmp")
    Image.fromarray((ramp * 3).astype(np.float32)).save(tmp_path / "float_beyond_1.tif")
    Image.fromarray(np.full((32, 48), np.nan, np.float32)).save(tmp_path / "float_nan.tif")
    Image.fromarray((ramp * 60000).astype(np.int32)).save(tmp_path / "int32.tif")
    means = {}
    for path in sorted(tmp_path.iterdir()):
        decoded = decode_sample(str(path), SPEC)
        means[path.name] = decoded.problem.detail if decoded.problem else round(float(decoded.frames.mean()) / 255, 2)
    assert {k: means[k] for k in expected_grey} == {k: 0.5 for k in expected_grey}
    assert {k: means[k] for k in ("clear.png", "clear_grey.png", "clear_palette.png", "white.bmp")} == {
        "clear.png": 1.0, "clear_grey.png": 1.0, "clear_palette.png": 1.0, "white.bmp": 1.0}
    assert means["black.jpg"] == 0.0
    (tmp_path / "twelve_bit.tif").write_bytes(tiff_12bit([4095, 2048, 0]))
    twelve, _, notes = open_upright(tmp_path / "twelve_bit.tif")
    assert np.asarray(twelve)[0, :, 0].tolist() == [255, 128, 0] and notes == ["12-bit grey scaled to 8 bits"]
    assert "float pixels run from 0 to 3" in means["float_beyond_1.tif"]
    assert "NaN" in means["float_nan.tif"] and "32-bit integers" in means["int32.tif"]

    frames = [Image.fromarray(np.full((32, 48, 3), 20 * i, np.uint8)) for i in range(10)]
    for name in ("animated.webp", "animated.png", "animated.gif"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=125, loop=0)
        decoded = decode_sample(str(tmp_path / name), SPEC)
        assert not is_still(tmp_path / name) and decoded.problem is None, name
        assert decoded.frames.shape == (9, 32, 48, 3) and decoded.frames[-1].mean() > decoded.frames[0].mean() + 100
    frames[0].save(tmp_path / "one_frame.gif")
    assert is_still(tmp_path / "one_frame.gif") and is_still(tmp_path / "grey8.png")


def test_class5_hostile_lists_names_and_files_are_skipped_with_a_reason_never_a_traceback(tmp_path, monkeypatch):
    from cogft.data.doctor import diagnose, format_table

    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("fifo_caption", "folder_caption", "unreadable_caption", "caf\udce9"):  # the last: Latin-1 bytes
        shutil.copy(CLIP, folder / f"{name}.mp4")
        (folder / f"{name}.txt").write_text(f"a clip named {name.encode('utf-8', 'surrogateescape')!r}")
    (folder / "fifo_caption.txt").unlink()
    os.mkfifo(folder / "fifo_caption.txt")
    (folder / "folder_caption.txt").unlink()
    (folder / "folder_caption.txt").mkdir()
    os.mkfifo(folder / "pipe.mp4")
    (folder / "folder.mp4").mkdir()
    (folder / "dangling.mp4").symlink_to(folder / "gone.mp4")
    (folder / "loop.mp4").symlink_to(folder / "loop.mp4")
    (folder / "bomb.png").write_bytes(png_header(20000, 20000))
    Image.new("RGB", (100_000, 1)).save(folder / "sliver.png")  # 500 bytes; covering a 480x720 bucket would take 69 GB
    for name in ("pipe", "folder", "dangling", "loop", "bomb", "sliver"):
        (folder / f"{name}.txt").write_text("a caption")
    real_read = Path.read_bytes  # root reads any file whatever its mode, so the refusal is simulated

    def read_bytes(self):
        if self.name == "unreadable_caption.txt":
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    report = diagnose(folder, workers=1)
    rows = {row["listed_at"]: row for row in report["files"]}
    codes = {name: [p["code"] for p in row["problems"]][:1] for name, row in rows.items()}
    assert codes == {"bomb.png": ["image_unreadable"], "caf\udce9.mp4": [], "dangling.mp4": ["not_found"],
                     "fifo_caption.mp4": ["unreadable"], "folder.mp4": ["not_found"],
                     "folder_caption.mp4": ["unreadable"], "loop.mp4": ["not_found"], "pipe.mp4": ["not_a_video"],
                     "sliver.png": ["extreme_aspect"], "unreadable_caption.mp4": ["unreadable"]}
    assert "too large to decode safely" in rows["bomb.png"]["problems"][0]["detail"]
    assert "Permission denied" in rows["unreadable_caption.mp4"]["problems"][0]["detail"]
    assert "caf\\xe9.mp4" in format_table(report)  # printable: a terminal takes it

    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "videos.txt").symlink_to(lists / "gone.txt")  # read as a plain folder, it would train on something else
    (lists / "prompts.txt").write_text("a square\n")
    with pytest.raises(DatasetLayoutError, match="videos.txt: a symbolic link to .*gone.txt, which cannot be followed"):
        read_clips(lists)
    (lists / "videos.txt").unlink()
    os.mkfifo(lists / "videos.txt")
    with pytest.raises(DatasetLayoutError, match="videos.txt: not a regular file"):
        read_clips(lists)

    long_caption = "a square " * 20_000  # 180 KB, over the csv module's default field limit
    (tmp_path / "long.csv").write_text(f"video,caption\n{CLIP},{long_caption}\n")
    assert read_clips(tmp_path / "long.csv")[0].caption == long_caption.strip()
    (tmp_path / "quote.csv").write_text(f'video,caption\n{CLIP},"a square\n{CLIP},swallowed into the caption above\n')
    with pytest.raises(DatasetLayoutError, match=r"quote.csv: the row starting at line 2 is not valid CSV"):
        read_clips(tmp_path / "quote.csv")
    (tmp_path / "comma.csv").write_text(f"video,caption\n{CLIP},a square, bouncing\n")
    [comma] = read_clips(tmp_path / "comma.csv")
    assert comma.refused == ("invalid_entry", "the row has 3 fields but the header names 2; put a caption with a comma "
                                              "in double quotes")
    lines = [f'{{"video": "{CLIP}", "caption": {value}}}' for value in ('42', '["a", "b"]', 'true', '"\\ud83d"')]
    lines.append('{"video": null, "caption": "no file"}')
    (tmp_path / "types.jsonl").write_text("\n".join(lines))
    clips = read_clips(tmp_path / "types.jsonl")
    problems = admission_problems(clips, byte_duplicates(clips))
    assert [[p.code for p in problems[c.line]] for c in clips] == [["invalid_entry"]] * 3 + [["caption_not_utf8"],
                                                                                              ["invalid_entry"]]
    assert "its 'caption' is a number (42), not text" in problems[clips[0].line][0].detail
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetLayoutError, match="deep.jsonl: line 1 nests too deeply"):
        read_clips(tmp_path / "deep.jsonl")


def test_class5_latin1_file_names_are_prepared_and_cogft_sample_refuses_a_non_finite_guidance(make_config, tmp_path):
    import torch

    from cogft.cli import build_parser
    from cogft.data.cache import prepare
    from cogft.models.loading import load_for_config

    folder = tmp_path / "latin1"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9")
    shutil.copy(CLIP, folder / f"{name}.mp4")
    (folder / f"{name}.txt").write_text("a red square bouncing")
    config, variant = load_for_config(make_config(f"data.path={folder}", "validation.prompts=[]",
                                                  f"data.cache_dir={tmp_path / 'cache'}"))
    prepared = prepare(config, variant, torch.device("cpu"), show_progress=False)
    assert prepared.summary["encoded"] == 1 and prepared.summary["skipped"] == 0
    [row] = [row for row in prepared.report if "clip" in row]
    assert row["source"]["decoder"] == "decord"  # opened through a plain-named link, not handed to ffmpeg as a failure

    for value in ("inf", "nan", "-inf"):
        with pytest.raises(SystemExit) as stopped:
            build_parser().parse_args(["sample", "--from", "x", "--prompt", "p", "--out", "o.mp4",
                                       "--guidance-scale", value])
        assert stopped.value.code == 2

