"""Choosing a checkpoint: the recommended one (the lowest held-out eval loss within the quality limits) on written
metrics files, kept through the rotation and current during training, `cogft export --recommended`, report.html's
prompt x step grid, and `cogft compare`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from safetensors.torch import load_file

from cogft.cli import main
from cogft.config import QualityConfig
from cogft.run_dir import sample_path
from cogft.training.recommend import BLEED, MOTION, comparable_evals, recommend, update_recommended
from test_report import Page

LORA = "pytorch_lora_weights.safetensors"
PROMPT = "a red square bouncing across a blue background"
HOSTILE = "<script>alert(1)</script> & <i>more"
LIMITS = QualityConfig(min_motion_ratio=0.7, max_bleed=0.5)


def plain(page: str) -> str:
    """A page's text as read: the tags gone, the entities kept as written."""
    return re.sub(r"<[^>]+>", "", page)


def evals(**losses: float) -> list[dict]:
    return [{"step": int(step[1:]), "eval/loss": loss} for step, loss in losses.items()]


def test_a_measure_excludes_the_lowest_loss_checkpoint_judged_by_the_latest_measure_at_or_before_it():
    rows = [*evals(s100=0.50, s200=0.40, s300=0.30, s400=0.35, s500=0.45),
            {"step": 150, MOTION: 0.95}, {"step": 250, MOTION: 0.55},  # checkpoint 300 is judged by step 250's videos
            {"step": 400, MOTION: 0.90},                               # 400 by its own step's
            {"step": 500, BLEED: 0.8}, {"step": 600, MOTION: 0.1}]     # a measure after a checkpoint never counts
    record = recommend(rows, [100, 200, 300, 400, 500], LIMITS)
    assert record["step"] == 400 and record["checkpoint"] == "checkpoints/step-000400"
    assert record["eval_loss"] == 0.35 and record["measures"] == {MOTION: {"value": 0.9, "step": 400}}
    assert [(e["step"], e["why"]) for e in record["excluded"]] == [
        (300, "motion ratio 0.55 (step 250) below quality.min_motion_ratio=0.7"),
        (500, "bleed 0.8 (step 500) above quality.max_bleed=0.5")]
    assert "the 3 of 5 evaluated checkpoints within the limits" in record["reason"]
    assert "step 300 (0.3): motion ratio 0.55 (step 250) below" in record["reason"]  # why the lowest loss lost
    assert "step 500" not in record["reason"]  # a higher loss than the recommended one's: not part of the why
    # checkpoint 100 has no measure at or before it: not excluded; 200 is judged by 150's videos
    assert recommend(rows, [100, 200], LIMITS)["step"] == 200
    assert recommend(rows, [100, 200], QualityConfig(min_motion_ratio=0.96))["step"] == 100


def test_without_measures_the_lowest_eval_loss_of_a_checkpoint_is_recommended():
    rows = [*evals(s10=0.5, s20=0.3, s30=0.3), {"step": 15, "eval/loss": 0.1},  # 15: eval.every, no checkpoint
            {"step": 20, MOTION: float("nan")}]  # a NaN measure (a still base render) excludes nothing
    record = recommend(rows, [10, 20, 30], LIMITS)
    assert record["step"] == 20 and not record["excluded"]  # a tie goes to the earlier checkpoint
    assert "all 3 evaluated checkpoints, each within the limits" in record["reason"]
    assert "motion ratio and bleed were not measured" in record["reason"]
    # a checkpoint without an eval loss (a Ctrl-C's) is no candidate; nor one evaluated on another held-out set
    assert recommend(rows, [10, 20, 30, 35], LIMITS)["step"] == 20
    assert recommend(rows, [10, 20, 30], LIMITS, evals_after=20)["step"] == 30
    nothing = recommend(rows, [5], LIMITS)
    assert nothing["step"] is None and "no checkpoint has a held-out eval loss yet" in nothing["reason"]


def test_when_no_checkpoint_is_acceptable_none_is_recommended_and_the_reason_says_why():
    rows = [*evals(s1=0.5, s2=0.4), {"step": 1, MOTION: 0.2}, {"step": 2, BLEED: 0.9}]
    record = recommend(rows, [1, 2], LIMITS)
    assert record["step"] is None and record["checkpoint"] is None
    assert record["reason"] == (
        "none of the 2 evaluated checkpoints is within the limits (motion ratio >= 0.7, bleed <= 0.5): step 1: motion "
        "ratio 0.2 (step 1) below quality.min_motion_ratio=0.7; step 2: motion ratio 0.2 (step 1) below "
        "quality.min_motion_ratio=0.7; bleed 0.9 (step 2) above quality.max_bleed=0.5. The lowest eval loss regardless "
        "of the measures is step 2's (cogft export --best)")
    assert recommend(rows, [1, 2], QualityConfig(min_motion_ratio=0, max_bleed=1))["step"] == 2  # limits off


def test_a_resume_compares_eval_losses_only_on_the_same_held_out_set():
    assert comparable_evals(None, "a", 0) == {"eval_set": "a", "after": 0}
    assert comparable_evals({"eval_set": "a", "after": 0}, "a", 40) == {"eval_set": "a", "after": 0}
    assert comparable_evals({"eval_set": "a", "after": 0}, "b", 40) == {"eval_set": "b", "after": 40}
    assert comparable_evals({"eval_set": "a", "after": 0}, None, 40) == {"eval_set": None, "after": 40}


def complete(run: Path, *steps: int) -> None:
    for step in steps:
        folder = run / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "cogft_complete.json").write_text(json.dumps({"step": step}))


def test_the_record_is_written_from_the_metrics_file_and_spared_by_the_rotation(make_config, tmp_path):
    from accelerate import Accelerator

    from cogft.training.checkpointing import save_checkpoint

    run = tmp_path / "run"
    complete(run, 1, 2)
    rows = [*evals(s1=0.5, s2=0.4, s3=0.3), {"step": 2, MOTION: 0.3}, "not json", {"step": 3, MOTION: 0.3}]
    (run / "metrics.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    record = update_recommended(run, LIMITS, {"eval_set": "set", "after": 0})
    assert json.loads((run / "recommended.json").read_text()) == record and record["step"] == 1  # 3: no checkpoint
    save_checkpoint(Accelerator(cpu=True), run, 3, 1, make_config())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000003"]
    update_recommended(run, LIMITS, {"eval_set": None, "after": 3})  # eval.holdout turned off: no recommendation
    assert not (run / "recommended.json").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_cache):
    """3 LoRA steps, a checkpoint, evaluation and validation video after each, one checkpoint kept; the eval logs a
    bleed (as the trigger measure would) that is acceptable at step 1 only."""
    from cogft.config_file import load_config
    from cogft.training.evaluation import HeldOutEval
    from cogft.training.loop import train

    root = Path(__file__).resolve().parent.parent
    original = HeldOutEval.__call__

    def with_bleed(self, model):
        metrics = original(self, model)
        self.calls = getattr(self, "calls", 0) + 1
        return {**metrics, BLEED: 0.1 if self.calls == 1 else 0.9}

    config = load_config(root / "configs" / "tiny-lora.yaml", [
        f"data.path={root / 'data'}", f"data.cache_dir={shared_cache}",
        f"output_dir={tmp_path_factory.mktemp('choice') / 'run'}", "tracking.report_to=none", "train.max_steps=3",
        "train.checkpoint_every=1", "train.checkpoints_keep=1", "eval.holdout=2", "validation.every=1",
        f"validation.prompts=[{PROMPT}]", "validation.num_inference_steps=1", "train.lr_warmup_steps=0",
        "lora.rank=4"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HeldOutEval, "__call__", with_bleed)
        return train(config)


def test_training_keeps_the_recommended_checkpoint_through_the_rotation(trained):
    from cogft.config_file import load_config
    from cogft.training.metric_rows import logged_rows
    from cogft.training.summary import run_summary

    record = json.loads((trained / "recommended.json").read_text())
    best = json.loads((trained / "best.json").read_text())["step"]
    kept = sorted(int(p.name[5:]) for p in (trained / "checkpoints").iterdir())
    assert best == 3, "the eval loss falls here: the lowest is the newest checkpoint's"
    assert kept == [1, 3]  # the recommended one and the newest (train.checkpoints_keep=1); step 2 went
    assert record == recommend(logged_rows(trained), kept, LIMITS) and record["step"] == 1
    assert record["measures"][BLEED] == {"value": 0.1, "step": 1}
    assert record["measures"][MOTION]["step"] == 1  # the motion guard's ratio of that step's validation
    said = run_summary(load_config(trained / "config.yaml"), trained, stopped=False)
    assert "recommended checkpoint: step 1, the lowest held-out eval loss" in said and "--recommended)" in said


def test_export_recommended_writes_that_checkpoints_weights(trained, tmp_path, capsys):
    assert main(["export", "--from", str(trained), "--out", str(tmp_path / "rec"), "--recommended"]) == 0
    exported, chosen = load_file(tmp_path / "rec" / LORA), load_file(trained / "checkpoints" / "step-000001" / LORA)
    newest = load_file(trained / "checkpoints" / "step-000003" / LORA)
    assert exported.keys() == chosen.keys()
    assert all(torch.equal(exported[k], chosen[k].half()) for k in chosen)  # released in the model's dtype
    assert not all(torch.equal(exported[k], newest[k].half()) for k in chosen)
    assert main(["export", "--from", str(trained), "--out", str(tmp_path / "x"), "--recommended", "--best"]) == 2
    assert "give one of them" in capsys.readouterr().err

    run = tmp_path / "none"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    update_recommended(run, QualityConfig(max_bleed=0.05), {"eval_set": "set", "after": 0})
    assert main(["export", "--from", str(run), "--out", str(tmp_path / "y"), "--recommended"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint of" in err and "is recommended" in err and "--best" in err
    (run / "recommended.json").write_text('{"step": 1, "reason": "cut')  # a kill or a full disk, by hand
    assert main(["export", "--from", str(run), "--out", str(tmp_path / "w"), "--recommended"]) == 2
    assert "recommended.json is damaged (not JSON" in capsys.readouterr().err
    (run / "recommended.json").unlink()
    assert main(["export", "--from", str(run), "--out", str(tmp_path / "z"), "--recommended"]) == 2
    assert "needs eval.holdout" in capsys.readouterr().err


def test_the_report_grid_lists_prompt_by_step_with_the_base_renders_and_the_recommendation(trained, tmp_path):
    from cogft.config_file import load_config
    from cogft.training.report import write_run_report

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    videos = [sample_path(run, step, 0, PROMPT).relative_to(run).as_posix() for step in (0, 1, 2, 3)]
    videos[0] = videos[0].replace("samples/", "samples/base/")  # the motion guard's base render: a step-0 sample's name
    assert (run / videos[0]).is_file()
    html = write_run_report(load_config(run / "config.yaml"), run, stopped=False).read_text()
    page = Page(html)
    grid = html[html.index('<div class="grid">'):]
    header, row = grid.split("</tr>")[:2]
    assert [h.split("<br>")[0] for h in header.split("<th>")[2:]] == [
        "base model", "step 1", "step 2", "step 3"]
    assert PROMPT in row and row.count("<video") == 4  # one prompt x (base, 3 steps)
    assert page.videos == videos
    assert 'recommended</strong><br>eval loss' in header.split("<th>")[3]  # step 1's column
    text = plain(html)
    assert "Recommended: step-000001, the lowest held-out eval loss" in text and "--recommended" in text
    assert "lower eval losses are outside them: step 3 (" in text  # step 2 went in the rotation: not a candidate
    assert "bleed 0.9 (step 3) above quality.max_bleed=0.5" in text
    assert page.curves["quality/bleed"] == 3 and 'data-limit="quality.max_bleed=0.5"' in html
    assert not {"script", "link", "iframe", "img"} & page.tags
    assert all((run / unquote(url)).exists() for url in page.urls)


@pytest.fixture(scope="module")
def other_run(tmp_path_factory, shared_cache):
    """A second tiny run of the same prompt and a hostile one: another learning rate, a hostile caption prefix, no
    eval, and a folder name a URL must quote."""
    from cogft.config_file import load_config
    from cogft.training.loop import train

    root = Path(__file__).resolve().parent.parent
    return train(load_config(root / "configs" / "tiny-lora.yaml", [
        f"data.path={root / 'data'}", f"data.cache_dir={shared_cache}",
        f"output_dir={tmp_path_factory.mktemp('choice') / 'b&<i>x<i>?%23'}", "tracking.report_to=none",
        "train.max_steps=2", "train.checkpoint_every=2", "validation.every=2",
        f"validation.prompts=[{PROMPT}, {HOSTILE}]", "validation.num_inference_steps=1", "train.learning_rate=0.002",
        "data.caption_prefix=<b>sks</b>"]))


def test_compare_puts_two_runs_side_by_side(trained, other_run, tmp_path, capsys):
    out = tmp_path / "pages" / "compare.html"
    assert main(["compare", str(trained), str(other_run), "--out", str(out)]) == 0
    html = out.read_text()
    page = Page(html)
    assert not {"script", "link", "iframe", "img", "i", "b"} & page.tags  # the folder name and the prefix: escaped
    assert "&lt;b&gt;sks&lt;/b&gt;" in html and "b&amp;&lt;i&gt;x&lt;i&gt;?%23" in html
    settings = html[html.index("Settings that differ"):html.index("<h2>Loss")]
    for key in ("data.caption_prefix", "train.learning_rate", "eval.holdout", "train.max_steps"):
        assert f"<code>{key}</code>" in settings
    assert "output_dir" not in settings and "<code>lora.rank</code>" in settings  # 4 against the config's 8
    text = plain(html)
    assert "these runs differ in data.caption_prefix, eval.holdout" in text
    loss = html[html.index("<h2>Loss"):html.index("<h2>Held-out")]
    assert Page(loss).curves == {"run": 3, "b&<i>x<i>?%23": 2}  # each run's smoothed loss, overlaid
    assert 'data-limit="quality.max_bleed=0.5"' in html  # the first run's bleed, with its limit
    # the same prompt side by side: the first run's recommended step, the other's latest, by paths from the page
    assert len(page.videos) == 3 and all((out.parent / unquote(src)).is_file() for src in page.videos)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;i&gt;more" in html  # its own row: the first run lacks it
    assert "step 1 (recommended)" in text and "step 2 (latest)" in text
    assert "Recommended: step-000001" in text
    assert "needs a held-out eval loss" in text  # the other run has no eval.holdout

    assert main(["compare", str(trained), "--out", str(out)]) == 2
    assert "needs two runs or more" in capsys.readouterr().err
    assert main(["compare", str(trained), str(tmp_path), "--out", str(out)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
