"""tracking.report_to: tensorboard, through accelerate's tracker: event files under the run directory that read as
one run after a resume, the config as flat hparams, and a refusal naming the extra when the package is missing."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from cogft.config import ConfigError
from cogft.training.loop import train

FAST = ["tracking.report_to=tensorboard", "validation.prompts=[]", "train.checkpoint_every=2", "train.max_steps=4"]


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def metrics(run_dir, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row[key]) for row in rows]


def test_a_run_logs_to_tensorboard_and_a_resume_reads_as_one_run(make_config):
    pytest.importorskip("tensorboard")
    run = train(make_config(*FAST))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    first = scalars(run, "loss")
    assert [s for s, _ in first] == [1, 2, 3, 4] and dict(first) == pytest.approx(dict(metrics(run, "loss")))
    assert [s for s, _ in scalars(run, "lr")] == [1, 2, 3, 4]
    hparams = yaml.safe_load(next((run / "tensorboard").glob("*/hparams.yml")).read_text())
    assert hparams["train.max_steps"] == 4 and hparams["lora.target_modules"] == "['to_q', 'to_k', 'to_v', 'to_out.0']"

    # a crash after step 2's checkpoint: the resume redoes steps 3 and 4, and their first events are purged
    shutil.rmtree(run / "checkpoints" / "step-000004")
    train(make_config(*FAST))
    resumed = scalars(run, "loss")
    assert [s for s, _ in resumed] == [1, 2, 3, 4]
    assert dict(resumed) == pytest.approx(dict(metrics(run, "loss")))


def test_a_missing_tensorboard_is_refused_before_prepare(make_config, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else real(name, *args))
    config = make_config(*FAST)
    with pytest.raises(ConfigError, match=r'tracking.report_to=tensorboard: .* pip install "cogft\[tensorboard\]"'):
        train(config)
    assert not (Path(config.output_dir) / "prepare_report.jsonl").exists()  # refused before prepare
