import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from cogft.data.checks import caption_problem
from cogft.data.sources import DatasetLayoutError, read_clips
from cogft.data.video import DecodeSpec, decode_clip, select_frames

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


def test_txt_pair_layout_reads_all_sample_clips():
    clips = read_clips(DATA)
    assert len(clips) >= 6
    assert all(c.video.is_file() and c.caption for c in clips)
    assert len({c.caption for c in clips}) == len(clips)


def test_csv_and_jsonl_layouts(tmp_path):
    (tmp_path / "meta.csv").write_text("file,text\nclips/a.mp4,a cat\nclips/b.mp4,\n")
    clips = read_clips(tmp_path / "meta.csv", video_column="file", caption_column="text")
    assert [c.video for c in clips] == [tmp_path / "clips/a.mp4", tmp_path / "clips/b.mp4"]
    assert [c.caption for c in clips] == ["a cat", ""]
    (tmp_path / "meta.jsonl").write_text(json.dumps({"video": "x.mp4", "caption": "a dog"}) + "\n")
    assert read_clips(tmp_path / "meta.jsonl")[0].caption == "a dog"
    with pytest.raises(DatasetLayoutError, match="no 'video' column"):
        read_clips(tmp_path / "meta.csv")
    (tmp_path / "latin1.csv").write_bytes("video,caption\na.mp4,un caf\xe9\nb.mp4\n".encode("latin-1"))
    bad, short = read_clips(tmp_path / "latin1.csv")
    assert caption_problem(bad.caption).code == "caption_not_utf8" and short.caption is None


def test_mismatched_txt_pair_is_an_error(tmp_path):
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\n")
    (tmp_path / "prompts.txt").write_text("only one\n")
    with pytest.raises(DatasetLayoutError, match="videos.txt has 2 lines but prompts.txt has 1"):
        read_clips(tmp_path)


def uniform(n: int, fps: float):
    starts = np.arange(n) / fps
    return starts, n / fps


def test_windows_spread_over_the_clip_at_the_target_rate():
    spec = DecodeSpec((9,), 64, 96, 8.0, windows=3)
    selection = select_frames(*uniform(72, 24.0), spec)  # 24 frames at 8 fps: windows start at 0, 8 and 15
    assert selection.offsets == (0, 8, 15)
    assert selection.windows[1] == tuple(range(24, 51, 3)) and selection.windows[2] == tuple(range(45, 72, 3))
    assert selection.indices == selection.windows[0]
    exact = select_frames(*uniform(27, 24.0), spec)  # 9 frames at 8 fps: room for one window only
    assert exact.offsets == (0,) and len(exact.windows) == 1


def test_frames_resample_to_target_fps():
    selection = select_frames(*uniform(72, 24.0), DecodeSpec((9,), 64, 96, 8.0))
    assert selection.indices == (0, 3, 6, 9, 12, 15, 18, 21, 24) and "24 -> 8 fps" in selection.notes[0]
    assert selection.available == 24
    assert select_frames(*uniform(72, 24.0), DecodeSpec((9,), 64, 96, None)).indices == tuple(range(9))
    problem = select_frames(*uniform(20, 24.0), DecodeSpec((9,), 64, 96, 8.0))
    assert problem.code == "too_short" and "7 frame(s) at 8 fps" in problem.detail


def test_decode_crops_wide_clip_to_target_without_distortion():
    decoded = decode_clip(str(DATA / "videos" / "wide_cellular.mp4"), DecodeSpec((9,), 64, 96, 8.0))
    assert decoded.problem is None
    assert decoded.frames.shape == (9, 64, 96, 3) and decoded.frames.dtype == np.uint8
    assert "scaled 640x360 -> 114x64, centre-cropped to 96x64" in decoded.notes


def test_decode_reports_bad_files(tmp_path):
    bad = tmp_path / "not_a_video.mp4"
    bad.write_text("hello")
    decoded = decode_clip(str(bad), DecodeSpec((9,), 64, 96, 8.0))
    assert decoded.frames is None and decoded.problem.code == "not_a_video"


def test_prepare_caches_by_content_and_reports_skips(make_config, tmp_path):
    from cogft.data.cache import prepare
    from cogft.models.loading import load_variant

    data = tmp_path / "clips"
    data.mkdir()
    shutil.copy(DATA / "videos" / "bouncing_square.mp4", data / "one.mp4")
    (data / "empty.mp4").write_bytes(b"")
    (data / "videos.txt").write_text("one.mp4\nmissing.mp4\nempty.mp4\none.mp4\n./one.mp4\n")
    (data / "prompts.txt").write_text("a red square\na ghost\nnothing\n\na red square\n")
    config = make_config(f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}")
    family = load_variant(config.model.path)
    first = prepare(config, family, torch.device("cpu"), show_progress=False)
    statuses = {r["listed_at"]: (r["status"], r.get("problem")) for r in first.report[:-1]}
    assert statuses["videos.txt:1"][0] == "encoded"
    assert statuses["videos.txt:2"] == ("skipped", "not_found")
    assert statuses["videos.txt:3"] == ("skipped", "empty_file")
    assert statuses["videos.txt:4"] == ("skipped", "empty_caption")
    assert statuses["videos.txt:5"] == ("skipped", "duplicate")
    assert first.summary["skipped_by_reason"] == {"not_found": 1, "empty_file": 1, "empty_caption": 1, "duplicate": 1}
    assert len(first.entries) == 1
    resident = psutil.Process().memory_info().rss / 2**30  # what `cogft estimate` calls the host peak of prepare
    assert resident - 0.01 <= first.summary["host_peak_gib"] < psutil.virtual_memory().total / 2**30
    from safetensors.torch import load_file

    latents = load_file(first.entries[0].latents[0])
    assert latents["latent_mean"].shape == (4, 3, 8, 12)  # C, (9-1)/4+1 frames, 64/8, 96/8
    assert load_file(first.entries[0].prompt)["prompt_embeds"].shape == (16, 32)
    assert Path(first.negative_prompt).is_file()
    assert all(Path(p).is_file() for _, p in first.validation_prompts)

    # a renamed clip is the same content: nothing is encoded again
    (data / "one.mp4").rename(data / "renamed.mp4")
    (data / "videos.txt").write_text("renamed.mp4\n")
    (data / "prompts.txt").write_text("a red square\n")
    second = prepare(config, family, torch.device("cpu"), show_progress=False)
    assert [r["status"] for r in second.report[:-1]] == ["cached"]
    assert second.entries[0].latents == first.entries[0].latents

    # a different frame size is a different cache entry
    third = prepare(make_config(f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}", "data.height=32"),
                    family, torch.device("cpu"), show_progress=False)
    assert [r["status"] for r in third.report[:-1]] == ["encoded"]
    assert third.entries[0].latents != first.entries[0].latents


def test_prepare_killed_mid_run_resumes_with_only_the_missing_entries(tmp_path):
    """kill -9 (the whole process group: prepare and its decode workers) after the first entry lands."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    command = [sys.executable, "-m", "cogft.cli", "prepare", "--config", str(REPO / "configs" / "tiny-lora.yaml"),
               f"data.path={DATA}", f"data.cache_dir={cache}", f"output_dir={run}", "tracking.report_to=none",
               "data.decode_workers=1"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 180
    while not list(cache.glob("latents/*/*.safetensors")):
        assert first.poll() is None, "prepare ended before it wrote an entry"
        assert time.monotonic() < deadline, "no cache entry after 180 s"
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done = len(list(cache.glob("latents/*/*.safetensors")))
    assert 1 <= done < 6

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "prepare_report.jsonl").read_text().splitlines()]
    summary = rows[-1]["summary"]
    assert (summary["cached"], summary["encoded"], summary["kept"]) == (done, 6 - done, 6)
    assert len(list(cache.glob("latents/*/*.safetensors"))) == 6


def test_random_windows_are_encoded_once_and_drawn_per_epoch(make_config, tmp_path):
    from safetensors.torch import load_file

    from cogft.data.cache import prepare
    from cogft.data.dataset import LatentDataset
    from cogft.models.loading import load_variant

    config = make_config("data.windows=3", "data.fps=null", f"data.cache_dir={tmp_path / 'cache'}")
    family = load_variant(config.model.path)
    prepared = prepare(config, family, torch.device("cpu"), show_progress=False)
    assert all(len(e.latents) == 3 for e in prepared.entries)  # the sample clips hold 3 windows of 9 frames
    rows = [r for r in prepared.report if "clip" in r]
    assert all(r["windows"] == 3 and any("3 windows of 9 frames" in n for n in r["notes"]) for r in rows)
    first = next(e for e in prepared.entries if "fractal_zoom" in e.video)  # changes all along (unlike a loop)
    means = [load_file(path)["latent_mean"] for path in first.latents]
    assert not torch.equal(means[0], means[1]) and not torch.equal(means[1], means[2])
    # the clip's start is the same entry as without windows: a cache made with data.windows=1 is reused
    single = prepare(make_config("data.fps=null", f"data.cache_dir={tmp_path / 'cache'}"), family,
                     torch.device("cpu"), show_progress=False)
    assert [r["status"] for r in single.report if "clip" in r] == ["cached"] * len(rows)
    assert [e.latents for e in single.entries] == [e.latents[:1] for e in prepared.entries]
    assert not any("windows of" in n for r in single.report if "clip" in r for n in r["notes"])
    again = prepare(config, family, torch.device("cpu"), show_progress=False)
    assert [r["status"] for r in again.report if "clip" in r] == ["cached"] * len(rows)
    assert all(any("3 windows of 9 frames" in n for n in r["notes"]) for r in again.report if "clip" in r)

    dataset = LatentDataset(prepared.entries, seed=7)
    draws = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        draws.append([dataset.window(i) for i in range(len(dataset))])
    assert len({w for epoch in draws for w in epoch}) == 3  # every window gets its turn
    assert draws[0] != draws[1]
    dataset.set_epoch(1)
    assert [dataset.window(i) for i in range(len(dataset))] == draws[1]  # a pure function of (seed, epoch, item)
    index = prepared.entries.index(first)
    assert torch.equal(dataset[index]["latent_mean"], means[dataset.window(index)])


def test_vae_compiles_on_gpus_only_when_enough_clips_pay_for_it():
    from cogft.data.cache import COMPILE_VAE_FROM_CLIPS, compile_vae_enabled

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_vae_enabled("auto", cuda, COMPILE_VAE_FROM_CLIPS)
    assert not compile_vae_enabled("auto", cuda, COMPILE_VAE_FROM_CLIPS - 1)
    assert not compile_vae_enabled("auto", cpu, 10_000)
    assert compile_vae_enabled(True, cpu, 1) and not compile_vae_enabled(False, cuda, 10_000)


def test_copies_of_one_clip_on_different_ranks_train_once(make_config, tmp_path):
    """Line 2 is a copy of line 1 (other name, same caption): with 2 ranks they land on different ranks,
    and rank 1 skips its copy before encoding it, because the check runs over the whole list."""
    from cogft.data.cache import prepare
    from cogft.models.loading import load_variant

    data = tmp_path / "clips"
    data.mkdir()
    shutil.copy(DATA / "videos" / "bouncing_square.mp4", data / "a.mp4")
    shutil.copy(DATA / "videos" / "bouncing_square.mp4", data / "copy_of_a.mp4")
    shutil.copy(DATA / "videos" / "fractal_zoom.mp4", data / "b.mp4")
    (data / "videos.txt").write_text("a.mp4\ncopy_of_a.mp4\nb.mp4\n")
    (data / "prompts.txt").write_text("a red square\na red square\nfractals\n")
    config = make_config(f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}")
    family = load_variant(config.model.path)
    rank0 = prepare(config, family, torch.device("cpu"), rank=0, world_size=2, show_progress=False)
    rank1 = prepare(config, family, torch.device("cpu"), rank=1, world_size=2, show_progress=False)
    assert [e.video for e in rank0.entries] == [str(data / "a.mp4"), str(data / "b.mp4")]
    assert rank1.entries == []
    dropped = next(row for row in rank1.report if row.get("listed_at") == "videos.txt:2")
    assert (dropped["status"], dropped["problem"], dropped["reason"]) == (
        "skipped", "duplicate", "the same video bytes and caption as videos.txt:1")
    assert rank1.summary["kept"] == 0 and rank1.summary["skipped_by_reason"] == {"duplicate": 1}


def test_damaged_cache_entries_are_found_and_made_again(make_config, tmp_path):
    """A flipped byte in a latent entry and a truncated prompt embedding: both detected by name, made again,
    noted in the report, never trained on."""
    from safetensors.torch import load_file

    from cogft.data.cache import entry_problem, prepare
    from cogft.models.loading import load_variant

    config = make_config(f"data.cache_dir={tmp_path / 'cache'}", "validation.prompts=[]")
    variant = load_variant(config.model.path)
    first = prepare(config, variant, torch.device("cpu"), show_progress=False)
    latent, prompt = Path(first.entries[0].latents[0]), Path(first.entries[0].prompt)
    good = load_file(latent)["latent_mean"].clone()
    blob = bytearray(latent.read_bytes())
    blob[-5] ^= 0xFF  # inside the tensor bytes: the file still parses
    latent.write_bytes(bytes(blob))
    prompt.write_bytes(prompt.read_bytes()[:-100])
    assert "checksum" in entry_problem(latent) and entry_problem(prompt) is not None

    again = prepare(config, variant, torch.device("cpu"), show_progress=False)
    assert again.summary["encoded"] == 1 and again.summary["cached"] == 5
    row = next(r for r in again.report if r.get("clip") == first.entries[0].video)
    assert row["status"] == "encoded" and any("damaged cache entry made again" in n for n in row["notes"])
    assert entry_problem(latent) is None and entry_problem(prompt) is None
    assert torch.equal(load_file(latent)["latent_mean"], good)


def test_prepare_does_not_dump_truncated_captions_padding_and_all(make_config, tmp_path, capfd):
    """The pipeline logs each truncated caption's cut-off tail as <pad> tokens; the report's note says it instead."""
    from cogft.data.cache import prepare
    from cogft.models.loading import load_for_config

    config, variant = load_for_config(make_config(f"data.cache_dir={tmp_path / 'cache'}", "validation.prompts=[]"))
    report = prepare(config, variant, torch.device("cpu"), show_progress=False).report
    err = capfd.readouterr().err
    assert "<pad>" not in err and "truncated because" not in err
    assert any(n.startswith("caption truncated") for row in report if "clip" in row for n in row["notes"])
