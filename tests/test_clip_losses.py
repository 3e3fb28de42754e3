"""Clips that hurt: per-sample losses recorded by the training step itself, resumed as one run, and the outliers
judged within each third of the schedule (`cogft doctor --losses`, report.html)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from cogft.cli import main
from cogft.training.clip_outliers import clip_losses, clips_section
from cogft.training.clip_records import CLIP_LOSSES_DIR, continue_records, read_samples
from cogft.training.loop import train

REPO = Path(__file__).resolve().parent.parent
FAST = ["validation.prompts=[]", "model.dtype=fp32", "train.checkpoint_every=2", "tracking.report_to=none"]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / CLIP_LOSSES_DIR / "rank-0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache) -> tuple[Path, Path]:
    """3 steps straight, and 2 steps then a resume to 3 whose first leg left a redone row and a part line behind
    (as a run killed after its checkpoint would)."""
    from cogft.config_file import load_config

    root = tmp_path_factory.mktemp("clips")

    def run(out: str, steps: int) -> Path:
        return train(load_config(REPO / "configs" / "tiny-lora.yaml", [
            f"data.path={REPO / 'data'}", f"data.cache_dir={shared_cache}", f"output_dir={root / out}",
            f"train.max_steps={steps}", *FAST]))

    straight = run("straight", 3)
    resumed = run("resumed", 2)
    with (resumed / CLIP_LOSSES_DIR / "rank-0.jsonl").open("a") as file:
        file.write('{"step":3,"clip":["x"],"t":[1],"loss":[9.0]}\n{"step":4,"cl')
    return straight, run("resumed", 3)


def test_recorded_losses_are_the_objectives_per_sample_losses(runs):
    """Step 1's records, recomputed by hand from the same draws with the initial model (a LoRA starts as the base):
    each is w_t · mean((x0_hat − x0)²); and every step's mean is its logged loss, bit for bit."""
    from cogft.config_file import load_config
    from cogft.data.cache import prepare
    from cogft.data.dataset import LatentDataset, collate
    from cogft.models.family import TrainingDraws
    from cogft.models.loading import load_scheduler, load_transformer, load_variant
    from cogft.training.checkpointing import sample_generators
    from cogft.training.clip_losses import entry_id

    straight, _ = runs
    rows = rows_of(straight)
    logged = {r["step"]: r["loss"] for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert [r["step"] for r in rows] == [1, 2, 3] and all(len(r["clip"]) == 2 for r in rows)
    for r in rows:
        assert torch.tensor(r["loss"], dtype=torch.float32).mean().item() == logged[r["step"]]

    config = load_config(straight / "config.yaml", [])
    variant = load_variant(config.model.path, "fp32")
    entries = prepare(config, variant, torch.device("cpu"), show_progress=False).entries
    dataset = LatentDataset(entries)
    by_id = {entry_id(e): i for i, e in enumerate(entries)}
    batch = collate([dataset[by_id[clip]] for clip in rows[0]["clip"]])
    scheduler = load_scheduler(config.model.path, variant)
    generators = sample_generators(config.train.seed, 0, 0, 0, 2, torch.device("cpu"))
    inputs = variant.draw_inputs(batch, TrainingDraws(generators), scheduler)
    assert inputs.timesteps.tolist() == rows[0]["t"]
    transformer = load_transformer(config.model.path, variant)
    a = scheduler.alphas_cumprod.float()[inputs.timesteps].view(-1, 1, 1, 1, 1)
    x_t = a.sqrt() * inputs.x0 + (1 - a).sqrt() * inputs.noise
    with torch.no_grad():
        v_hat = variant.predict(transformer, x_t, inputs.timesteps, inputs).float()
    x0_hat = a.sqrt() * x_t - (1 - a).sqrt() * v_hat
    expected = ((x0_hat - inputs.x0) ** 2).mean(dim=(1, 2, 3, 4)) / (1 - a.view(-1))
    torch.testing.assert_close(torch.tensor(rows[0]["loss"]), expected, rtol=1e-5, atol=1e-6)


def test_a_resumed_run_records_the_same_rows(runs):
    straight, resumed = runs
    ours = (resumed / CLIP_LOSSES_DIR / "rank-0.jsonl").read_text()
    assert ours == (straight / CLIP_LOSSES_DIR / "rank-0.jsonl").read_text()
    clips = json.loads((resumed / CLIP_LOSSES_DIR / "clips.json").read_text())
    assert clips["schedule"] == 1000 and len(clips["clips"]) == 6
    report = [json.loads(line) for line in (resumed / "prepare_report.jsonl").read_text().splitlines()]
    table = clip_losses(resumed)
    assert table["samples"] == 6 and table["steps"] == [1, 3]
    for clip in table["per_clip"]:  # each recorded clip links to its own prepare_report row
        assert report[clip["report_row"] - 1]["clip"] == clip["video"]
        assert report[clip["report_row"] - 1]["listed_at"] == clip["listed_at"]
    page = (resumed / "report.html").read_text()
    assert "<h2>Clips that hurt</h2>" in page and "6 samples of 6 clips" in page


def test_a_fresh_start_drops_old_rows_and_a_resume_the_later_ones(tmp_path):
    folder = tmp_path / CLIP_LOSSES_DIR
    folder.mkdir()
    for rank in (0, 1):  # a resume on fewer processes still drops the other rank's later rows
        (folder / f"rank-{rank}.jsonl").write_text("".join(
            json.dumps({"step": s, "clip": ["a"], "t": [5], "loss": [1.0]}) + "\n" for s in (1, 2, 3)) + '{"st')
    (folder / "clips.json").write_text('{"schedule": 1000, "clips": {}}')
    continue_records(tmp_path, 2)
    assert [s.step for s in read_samples(tmp_path)] == [1, 1, 2, 2]
    continue_records(tmp_path, None)
    assert read_samples(tmp_path) == [] and not (folder / "clips.json").exists()


def _base(t: float) -> float:
    return 0.2 + 2.0 * (t / 1000) ** 2  # the loss grows steeply with t, inside each third too


def write_records(run: Path) -> None:
    """12 clips, 30 samples each over the schedule (the same noise for all): c03 fits badly at high noise only,
    c07 far better everywhere, c09 is sampled only at the top of each third (where every clip's loss is higher)."""
    rng = random.Random(0)
    folder = run / CLIP_LOSSES_DIR
    folder.mkdir(parents=True)
    clips, report = {}, []
    for c in range(12):
        clips[f"c{c:02d}"] = {"video": f"/data/clip{c}.mp4", "caption": f"caption {c}",
                              "listed_at": f"videos.txt:{c + 1}", "set": 0}
        report.append({"clip": f"/data/clip{c}.mp4", "listed_at": f"videos.txt:{c + 1}", "status": "encoded"})
    report.append({"summary": {"kept": 12}})
    (run / "prepare_report.jsonl").write_text("".join(json.dumps(r) + "\n" for r in report))
    (folder / "clips.json").write_text(json.dumps({"schedule": 1000, "clips": clips}))
    lines = []
    for k in range(30):
        samples = []
        for c in range(12):
            t = (k * 997 // 30 + c * 7) % 1000
            if c == 9:
                t = (0, 333, 666)[k % 3] + 300 + k % 30  # the top tenth of each third
            factor = 2.5 if c == 3 and t >= 666 else 0.4 if c == 7 else 1.0
            samples.append((f"c{c:02d}", t, _base(t) * factor * math.exp(rng.gauss(0, 0.05))))
        lines.append(json.dumps({"step": k + 1, "clip": [s[0] for s in samples], "t": [s[1] for s in samples],
                                 "loss": [s[2] for s in samples]}) + "\n")
    half = len(lines) // 2  # two ranks' files, merged when read
    (folder / "rank-0.jsonl").write_text("".join(lines[:half]))
    (folder / "rank-1.jsonl").write_text("".join(lines[half:]))


def test_outliers_are_judged_within_each_third(tmp_path):
    write_records(tmp_path)
    table = clip_losses(tmp_path)
    assert table["samples"] == 360 and table["clips"] == 12 and not table["unjudged"]
    found = {(o["clip"], o["direction"]): o for o in table["outliers"]}
    assert set(found) == {("c03", "high"), ("c07", "low")}
    high, low = found["c03", "high"], found["c07", "low"]
    assert [t["range"] for t in high["thirds"]] == ["t666_1000"] and high["reason"] == "caption or scene cut"
    assert [t["range"] for t in low["thirds"]] == ["t000_333", "t333_666", "t666_1000"]
    assert low["reason"] == "duplicate or memorised"
    assert high["report_row"] == 4 and high["listed_at"] == "videos.txt:4" and low["report_row"] == 8
    section = clips_section(tmp_path)  # report.html's
    assert "/data/clip3.mp4" in section and '<a href="prepare_report.jsonl">row 4</a> (videos.txt:4)' in section
    assert "duplicate or memorised" in section and "/data/clip9.mp4" not in section
    # c09's raw mean loss is above most clips' in every third (it is only seen at their top), yet it is not judged
    # an outlier: each sample is compared with the samples near its own timestep
    per_clip = {c["clip"]: c["thirds"] for c in table["per_clip"]}
    for label in table["ranges"]:
        means = sorted(per_clip[c][label]["mean_loss"] for c in per_clip if c not in ("c03", "c07"))
        assert per_clip["c09"][label]["mean_loss"] >= means[-2]
        assert abs(per_clip["c09"][label]["z"]) < 3.5


def test_doctor_losses_lists_the_outliers(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["doctor", "--losses", str(empty)]) == 0
    assert "has no per-clip loss records yet" in capsys.readouterr().out
    assert main(["doctor", "--losses", str(empty), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 0

    run = tmp_path / "run"
    write_records(run)
    assert main(["doctor", "--losses", str(run)]) == 0
    text = capsys.readouterr().out
    assert "HIGH  /data/clip3.mp4 (videos.txt:4, prepare_report.jsonl row 4): likely caption or scene cut" in text
    assert "LOW   /data/clip7.mp4 (videos.txt:8, prepare_report.jsonl row 8): likely duplicate or memorised" in text
    assert "clip9" not in text
    assert main(["doctor", "--losses", str(run), "--json"]) == 0
    assert {o["clip"] for o in json.loads(capsys.readouterr().out)["outliers"]} == {"c03", "c07"}

    assert main(["doctor", "--losses", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    (run / CLIP_LOSSES_DIR / "rank-0.jsonl").write_text('{"step": 1}\n')
    assert main(["doctor", "--losses", str(run)]) == 2
    assert "line 1 is not a row" in capsys.readouterr().err
    shutil.rmtree(run / CLIP_LOSSES_DIR)
