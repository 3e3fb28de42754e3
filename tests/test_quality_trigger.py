"""Trigger binding and bleed (docs/quality.md): captions without their trigger, `eval/trigger_gain`, `quality/bleed`,
the summary's and report's warning, and the bench row of their cost."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from cogft.config import ConfigError
from cogft.config_file import load_config
from cogft.data.sources import data_sets, read_set
from cogft.data.triggers import check_trigger, without_triggers
from cogft.training.loop import Trainer, train
from cogft.training.trigger import bleed_ratio

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
# the sample clips with the trigger in front, and again without it as a prior set (towards the base model): the
# trigger is then the one thing that tells the LoRA's clips from what it must leave alone
BOUND = [f"data.sets=[{{path: {DATA}, caption_prefix: 'sks,'}}, {{path: {DATA}, kind: prior, caption_prefix: ''}}]",
         "data.path=null"]
# a high rate, decayed (at a constant 3e-2 some data orders diverge after step 60)
TRAINED_IN = ["train.max_steps=80", "train.checkpoint_every=40", "train.learning_rate=3e-2",
              "train.lr_scheduler=cosine"]
EVAL = ["validation.prompts=[]", "eval.holdout=2", "train.lr_warmup_steps=0", "tracking.report_to=none"]


def config_for(out: Path, cache: Path, *overrides: str):
    return load_config(REPO / "configs" / "tiny-lora.yaml", [f"data.path={DATA}", f"data.cache_dir={cache}",
                                                             f"output_dir={out}", *EVAL, *overrides])


def rows(run: Path, key: str) -> list[dict]:
    """The rows of metrics.jsonl with `key`, without the clock's columns."""
    return [{k: v for k, v in row.items() if k not in ("time", "eval/seconds", "quality/bleed_seconds")}
            for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in row]


def test_triggers_are_taken_out_as_whole_words_and_a_text_without_one_is_left_as_it_is():
    assert without_triggers("sks, a dog runs", ["sks,"]) == "a dog runs"
    assert without_triggers("in the sks style, zxq a dog runs", ["zxq", "in the sks style,"]) == "a dog runs"
    assert without_triggers("a photo of ohwx man walking", ["ohwx"]) == "a photo of man walking"
    assert without_triggers("a photo of ohwx, walking", ["ohwx"]) == "a photo of, walking"
    assert without_triggers("sks", ["sks"]) == ""
    for untouched in ("an  ohwxy dog ,sksa runs", "Ohwx man", "a dog"):  # part of a word, another case, none
        assert without_triggers(untouched, ["ohwx", "sks"]) == untouched


def _listed(folder: Path) -> Path:
    """Two sample clips, one caption with the trigger `ohwx` in it."""
    listed = folder / "list.csv"
    listed.write_text(f"video,caption\n{DATA}/videos/fractal_zoom.mp4,a zoom into ohwx\n"
                      f"{DATA}/videos/game_of_life.mp4,a simulation\n")
    return listed


def test_bad_trigger_values_are_refused_by_key(make_config, tmp_path, caplog):
    for bad in ('""', "' ohwx'", "','"):
        with pytest.raises(ConfigError, match=r"data\.trigger: .*not a trigger word"):
            make_config(f"data.trigger={bad}")
    listed = _listed(tmp_path)
    data_set = data_sets(make_config(f"data.path={listed}", "data.trigger=ohwx").data)[0]
    with caplog.at_level(logging.WARNING, logger="cogft.data.triggers"):
        check_trigger(data_set, read_set(data_set))
    assert "data.trigger='ohwx': in 1 of the 2 captions; the other 1 train without it" in caplog.text

    # nowhere: refused before anything is encoded (the cache stays empty)
    from cogft.data.cache import prepare
    from cogft.models.loading import load_for_config

    config, variant = load_for_config(make_config("data.trigger=ohwx", f"data.cache_dir={tmp_path / 'cache'}"))
    with pytest.raises(ConfigError, match=r"data\.trigger='ohwx': none of the 6 captions in .* contains it"):
        prepare(config, variant, torch.device("cpu"), show_progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_doctor_counts_the_captions_that_contain_the_trigger(tmp_path):
    from cogft.data.doctor import diagnose, format_table

    config = tmp_path / "doctor.yaml"
    config.write_text(f"model: {{path: 'tiny://2b'}}\noutput_dir: {tmp_path / 'run'}\n"
                      f"data: {{path: {_listed(tmp_path)}, num_frames: 9, height: 64, width: 96, trigger: ohwx}}\n")
    report = diagnose(config)
    assert report["trigger"] == {"data_trigger": "ohwx", "captions_containing_it": 1}
    assert "data.trigger 'ohwx': in the captions of 1 of the 2 listed clips" in format_table(report)


def test_bleed_is_a_ratio_of_changes_and_0_for_a_lora_that_changes_nothing():
    assert bleed_ratio(0.0, 0.0) == 0.0  # 0/0: a LoRA with zero effect leaks nothing
    assert bleed_ratio(0.0, 2.0) == 0.0
    assert bleed_ratio(1.0, 4.0) == 0.5  # of squared norms: the change without is half the change with
    assert bleed_ratio(1.0, 0.0) == float("inf")


def _set_up(config) -> tuple[dict, dict | None, Trainer]:
    """The eval and bleed metrics of a freshly set-up run (the LoRA still zero), and the trainer."""
    trainer = Trainer(config)
    try:
        trainer.setup()
        metrics = trainer.evaluation(trainer.unwrapped)
        bleed = trainer.bleed(trainer.unwrapped) if trainer.bleed is not None else None
    finally:
        trainer.accelerator.end_training()
        trainer.hold.release()
    return metrics, bleed, trainer


def test_without_a_trigger_the_gain_is_0_and_bleed_is_not_measured(tmp_path, shared_cache):
    metrics, bleed, trainer = _set_up(config_for(tmp_path / "plain", shared_cache))
    assert metrics["eval/trigger_gain"] == 0 and "eval/loss_no_trigger" not in metrics
    assert bleed is None and not any(e.untriggered_prompt for e in trainer.evaluation.clips)


def test_before_training_bleed_is_0_and_the_gain_is_the_base_models(tmp_path, shared_cache):
    """The LoRA's first weights change nothing: bleed 0 (0/0 read as 0) on the validation prompt, and the trigger
    gain is the base model's own, measured on captions whose embedding without the trigger differs."""
    from safetensors.torch import load_file

    metrics, bleed, trainer = _set_up(config_for(tmp_path / "fresh", shared_cache, *BOUND,
                                                 "validation.prompts=['sks, a red ball']", "validation.every=1000"))
    held = trainer.evaluation.clips
    assert all(e.untriggered_prompt and e.caption.startswith("sks, ") for e in held)
    assert not torch.equal(load_file(held[0].prompt)["prompt_embeds"],
                           load_file(held[0].untriggered_prompt)["prompt_embeds"])
    assert len(trainer.bleed.prompts) == 1 and bleed["quality/bleed"] == 0.0
    assert metrics["eval/loss_no_trigger"] != metrics["eval/loss"]
    assert metrics["eval/trigger_gain"] == metrics["eval/trigger_gain_base"] != 0


@pytest.fixture(scope="module")
def bound(tmp_path_factory, shared_cache) -> Path:
    """80 LoRA steps with the trigger bound by a prior set (seed 42), evaluated at steps 40 and 80."""
    return train(config_for(tmp_path_factory.mktemp("bound") / "run", shared_cache, *BOUND, *TRAINED_IN))


def test_the_trigger_gain_changes_sign_and_bleed_falls_when_the_trigger_is_trained_in(bound):
    """An honest tiny experiment (docs/quality.md gives the margins over seeds): the base model's trigger word is
    meaningless, its gain about 0 and here below it; trained in beside a prior set, the trigger lowers the held-out
    loss clearly, and the LoRA changes prompts without it far less than prompts with it."""
    evals, bleeds = rows(bound, "eval/loss"), rows(bound, "quality/bleed")
    assert [row["step"] for row in evals] == [row["step"] for row in bleeds] == [40, 80]
    last = evals[-1]
    # seed 42 (one data order: the clips are ordered by content): at step 80 the gain 0.191, bleed 0.33, down from
    # step 40's 0.85; over the data orders that earlier sessions drew, the gain 0.10 to 0.26, bleed 0.16 to 0.76,
    # down from step 40's 0.67 to 0.90 (by 0.15 to 0.54)
    assert -1e-3 < last["eval/trigger_gain_base"] < 0 < 0.03 < last["eval/trigger_gain"]
    assert last["eval/trigger_gain"] == pytest.approx(last["eval/loss_no_trigger"] - last["eval/loss"])
    assert bleeds[-1]["quality/bleed"] < min(0.9, bleeds[0]["quality/bleed"] - 0.1)  # leaks less as the trigger binds


def test_resume_is_bit_exact_with_the_trigger_measures(bound, tmp_path, shared_cache):
    run = tmp_path / "resumed"
    shutil.copytree(bound, run)
    shutil.rmtree(run / "checkpoints" / "step-000080")
    train(config_for(run, shared_cache, *BOUND, *TRAINED_IN))
    assert rows(run, "quality/bleed") == rows(bound, "quality/bleed")
    assert rows(run, "eval/trigger_gain") == rows(bound, "eval/trigger_gain")


def _metrics(run: Path, bleed: float) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in (
        {"step": 30, "eval/loss": 0.4, "eval/loss_no_trigger": 0.6, "eval/trigger_gain": 0.2,
         "eval/trigger_gain_base": -0.0005, "eval/lora_gain": 0.3, "eval/loss_base": 0.7},
        {"step": 30, "quality/bleed": bleed, "quality/bleed_seconds": 0.1})))


@pytest.mark.parametrize("bleed", [0.8, 0.3])
def test_the_summary_and_report_show_the_gain_and_warn_above_max_bleed(make_config, tmp_path, bleed):
    from cogft.training.report import write_run_report
    from cogft.training.summary import run_summary

    run = tmp_path / "run"
    _metrics(run, bleed)
    config = make_config(f"output_dir={run}", "quality.max_bleed=0.5")
    said = run_summary(config, run, stopped=False)
    page = write_run_report(config, run, stopped=False).read_text()
    assert "eval/trigger_gain +0.2 (the base model's -0.0005): the trigger calls up what was learnt" in said
    assert "trigger gain" in page and "eval/trigger_gain +0.2" in page
    above = "above quality.max_bleed=0.5: the LoRA leaks into other prompts"
    if bleed > 0.5:
        assert "WARNING: bleed: quality/bleed 0.8 at step 30: prompts without the trigger change 80 % as much" in said
        assert above in said and "<strong>warning:</strong>" in page and above in page
    else:
        assert "  bleed: quality/bleed 0.3 at step 30" in said and above not in said and above not in page


def test_bench_times_the_eval_with_and_without_the_trigger_measures(make_config):
    from cogft.bench.training import bench_eval

    emitted = []
    bench_eval(make_config("train.batch_size=1", "validation.prompts=[a, b]"), clips=2, warmup=0, steps=1,
               emit=emitted.append, trigger=True)
    plain, measured = emitted
    assert plain["figure"] == "held_out_eval" and measured["figure"] == "held_out_eval_trigger_bleed"
    assert measured["bleed_prompts"] == 2 and measured["bleed_s"] > 0 and measured["trigger_eval_s"] > 0
    assert measured["eval_s"] == pytest.approx(measured["trigger_eval_s"] + measured["bleed_s"], abs=2e-3)


def test_the_model_card_names_a_trigger_the_captions_contain():
    from cogft.config_file import build_config
    from cogft.inference.model_card import model_card
    from cogft.models.loading import load_for_config

    config, variant = load_for_config(build_config({"model": {"path": "THUDM/CogVideoX-2b"}, "output_dir": "run",
                                                    "data": {"path": "c", "trigger": "ohwx"}}), validates=False)
    card = model_card(config, variant, 10)
    assert card.data.instance_prompt == "ohwx" and "Name the subject **ohwx** in prompts" in card.text


def test_two_ranks_measure_what_one_rank_measures(make_config, tmp_path, shared_cache):
    """Two gloo ranks share the held-out clips and the bleed prompts (the captions here) and sum their tables: the
    numbers match one rank's run with the whole batch."""
    import os
    import subprocess
    import sys

    common = ["data.caption_prefix=sks,", "train.max_steps=2", "train.checkpoint_every=2", "eval.holdout=2",
              "validation.prompts=[]", "tracking.report_to=none", f"data.cache_dir={shared_cache}",
              "train.learning_rate=1e-2", "train.lr_warmup_steps=0"]  # a LoRA effect well above fp16's rounding
    two = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", "--config", "configs/tiny-lora.yaml", f"output_dir={two}",
                             "train.batch_size=1", *common], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    one = train(make_config(*common, "train.batch_size=2", out="one"))
    for key in ("quality/bleed", "eval/loss_no_trigger", "eval/trigger_gain_base"):
        (a,), (b,) = rows(two, key), rows(one, key)
        assert a[key] == pytest.approx(b[key], rel=1e-3), key
    assert rows(one, "quality/bleed")[0]["quality/bleed"] > 0
