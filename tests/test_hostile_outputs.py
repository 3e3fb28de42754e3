"""What a run writes and reads back, what it leaves behind, what it records and publishes, and what it says:
damaged records named (not tracebacks), workers that die with their parent, files that follow the umask, a
TensorBoard log that reads as one run, a model card that holds hostile prompts, and messages that are right."""

from __future__ import annotations

import json

import pytest

DAMAGED_JSON = {
    "truncated": b'{"step": 2, "eval_loss": 0.5, "checkpoi',
    "empty": b"",
    "not UTF-8": b'{"step": 2, "eval_loss": 0.5, "checkpoint": "checkpoints/step-000002\xff"}',
    "a list": b"[1, 2]",
    "wrong types": b'{"step": "2", "eval_loss": 0.5, "checkpoint": "checkpoints/step-000002"}',
    "a bool step": b'{"step": true, "eval_loss": 0.5, "checkpoint": "checkpoints/step-000002"}',
    "a NaN loss": b'{"step": 2, "eval_loss": NaN, "checkpoint": "checkpoints/step-000002"}',
    "an escaping path": b'{"step": 2, "eval_loss": 0.5, "checkpoint": "../../elsewhere"}',
    "nulls": b'{"step": null, "eval_loss": null, "checkpoint": null}',
}


@pytest.fixture
def run_with_checkpoints(make_config, tmp_path):
    """A run directory with its config and two complete (model-less) checkpoints, made in well under a second."""
    from accelerate import Accelerator

    from cogft.config import save_config
    from cogft.training.checkpointing import save_checkpoint

    config, run = make_config(), tmp_path / "run"
    run.mkdir()
    save_config(config, run / "config.yaml")
    accelerator = Accelerator(cpu=True)
    for step in (1, 2):
        save_checkpoint(accelerator, run, step, 5, config)
    return run


@pytest.mark.parametrize("how", sorted(DAMAGED_JSON))
def test_a_damaged_best_json_is_named_not_a_traceback(run_with_checkpoints, tmp_path, capsys, how):
    from cogft.cli import main
    from cogft.training.checkpointing import prune_checkpoints

    run = run_with_checkpoints
    (run / "best.json").write_bytes(DAMAGED_JSON[how])
    assert main(["export", "--from", str(run), "--out", str(tmp_path / "out"), "--best"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'best.json'} is damaged" in err and "--from" in err and "Traceback" not in err
    prune_checkpoints(run, 1)  # training's rotation: which checkpoint is best is unknown, so none goes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_other_damaged_records_are_named(run_with_checkpoints, tmp_path, caplog):
    from cogft.records import DamagedRecordError
    from cogft.run_dir import resolve_trained
    from cogft.tracking import continue_metrics, wandb_run_id
    from cogft.training.checkpointing import ResumeError, resolve_resume
    from cogft.training.summary import logged_rows

    run = run_with_checkpoints
    (run / "export.json").write_bytes(b'{"step": "last"}')
    with pytest.raises(DamagedRecordError, match=r"export.json is damaged \('step' is 'last', not a whole number"):
        resolve_trained(run)
    (run / "export.json").unlink()
    marker = run / "checkpoints" / "step-000002" / "cogft_complete.json"
    marker.write_bytes(b'{"step": 2, "files": {"a": "b"')
    with pytest.raises(ResumeError, match=r"cogft_complete.json is damaged \(not JSON.*train.resume=.*step-000001"):
        resolve_resume("latest", run)
    marker.write_bytes(b'{"step": 2, "files": ["x"]}')
    with pytest.raises(ResumeError, match=r"cogft_complete.json is damaged \(its 'files'"):
        resolve_resume("latest", run)
    import torch
    from safetensors.torch import save_file

    (run / "lora").mkdir()
    save_file({"w": torch.zeros(1)}, run / "lora" / "pytorch_lora_weights.safetensors")
    (run / "config.yaml").write_bytes(b"model:\n  path: \xff\xfe\n")
    with pytest.raises(DamagedRecordError, match=r"config.yaml is damaged \(not UTF-8"):
        resolve_trained(run)
    (run / "wandb_run_id").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DamagedRecordError, match="wandb_run_id is damaged"):
        wandb_run_id(run)
    rows = [b'{"step": 1, "loss_smoothed": 1.0}', b'{"step": "2", "loss_smoothed": 1.0}', b"\xff\xfe garbage",
            b"[3]", b'{"step": 3, "loss_smoothed": "x"}', b'{"step": 4, "loss_smoothed": 0.5}']
    (run / "metrics.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    assert [row["step"] for row in logged_rows(run)] == [1, 3, 4]
    assert "3 damaged rows" in caplog.text
    continue_metrics(run, 3)  # the resume's cut: damaged rows go with the redone ones
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 3]
