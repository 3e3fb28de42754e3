"""A run that survives anything: kill -9 anywhere, SIGINT, unsafe resumes, non-finite steps."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogft.training.checkpointing import ResumeError, complete_checkpoints
from cogft.training.loop import train

REPO = Path(__file__).resolve().parent.parent
FAST = ["validation.prompts=[]", "tracking.report_to=none"]


def logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def launch(out: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "train.py", "--config", "configs/tiny-lora.yaml", f"output_dir={out}",
            f"data.cache_dir={cache}", *FAST, *overrides]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_steps(out: Path, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(logged(out)) < count:
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "training did not progress"
        time.sleep(0.005)


def test_kill_9_anywhere_then_resume_is_bit_exact(make_config, shared_cache, tmp_path):
    steps = ["train.max_steps=10", "train.checkpoint_every=1", "train.checkpoints_keep=2"]
    straight = train(make_config(*FAST, *steps, out="straight"))
    expected = {row["step"]: row["loss"] for row in logged(straight)}

    out = tmp_path / "killed"
    rng = random.Random(7)
    for _ in range(2):  # kill at random moments: between steps, inside a step, inside a checkpoint write
        process = launch(out, shared_cache, *steps)
        wait_for_steps(out, len(logged(out)) + 2, process)
        time.sleep(rng.uniform(0, 0.03))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert all((p / "cogft_complete.json").is_file() for p in complete_checkpoints(out))
    final = launch(out, shared_cache, *steps)
    assert final.wait(timeout=120) == 0, final.stderr.read()[-3000:]

    rows = logged(out)
    assert [row["step"] for row in rows] == sorted(expected)  # one row per step: the redone ones replace theirs
    smoothed = {row["step"]: row["loss_smoothed"] for row in logged(straight)}
    for row in rows:  # the redone steps give the straight run's losses, and the smoothing carries on through kills
        assert row["loss"] == expected[row["step"]] and row["loss_smoothed"] == smoothed[row["step"]], row["step"]
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(complete_checkpoints(out)) == 2  # checkpoints_keep
    assert not list((out / "checkpoints").glob(".*partial"))  # a later save cleaned any half-written one


def test_sigint_writes_a_checkpoint_and_exits_cleanly(shared_cache, tmp_path):
    out = tmp_path / "run"
    process = launch(out, shared_cache, "train.max_steps=100000", "train.checkpoint_every=100000")
    wait_for_steps(out, 3, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    last = complete_checkpoints(out)[-1]
    assert int(last.name.split("-")[1]) == logged(out)[-1]["step"]
    assert not (out / "lora").exists()  # stopped early: no final export


def test_unsafe_config_change_on_resume_is_refused(make_config):
    train(make_config(*FAST, "train.max_steps=2", out="run"))
    with pytest.raises(ResumeError, match=r"lora\.rank: 8 -> 16"):
        train(make_config(*FAST, "train.max_steps=4", "lora.rank=16", out="run"))
    with pytest.raises(ResumeError, match=r"data\.height: 64 -> 32"):
        train(make_config(*FAST, "train.max_steps=4", "data.height=32", out="run"))
    with pytest.raises(ResumeError, match="already holds checkpoints"):  # a fresh start would mix with the old run
        train(make_config(*FAST, "train.max_steps=4", "lora.rank=16", "train.resume=null", out="run"))
    run = train(make_config(*FAST, "train.max_steps=4", "train.learning_rate=5e-4", out="run"))  # safe: applied
    rows = logged(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["lr"] == pytest.approx(1e-3 * 2 / 5) and rows[-1]["lr"] == pytest.approx(5e-4 * 4 / 5)  # warm-up 5


def test_resume_from_an_older_checkpoint_with_newer_ones_is_refused(make_config):
    run = train(make_config(*FAST, "train.max_steps=4", "train.checkpoint_every=2", out="run"))
    with pytest.raises(ResumeError, match="newer checkpoints \\(step-000004\\)"):
        train(make_config(*FAST, "train.max_steps=6", f"train.resume={run / 'checkpoints' / 'step-000002'}", out="run"))


@pytest.mark.parametrize("fused", [False, True])  # fused: the skip is decided on the device, without a host sync
def test_non_finite_gradient_skips_the_update(fused):
    from accelerate import Accelerator
    from diffusers import CogVideoXDPMScheduler

    from cogft.models.loading import load_variant
    from cogft.training.step import StepParts, TrainingStep

    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    step = TrainingStep(StepParts(
        accelerator=Accelerator(cpu=True), transformer=model, params=list(model.parameters()), optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False), noise_scheduler=CogVideoXDPMScheduler(),
        variant=load_variant("tiny://2b", "fp32"), max_grad_norm=1.0))
    assert step.skips_on_device == fused
    (model(torch.ones(1, 4)).sum() * float("nan")).backward()
    result = step.update(torch.tensor(float("nan")))
    assert not result.finite
    assert torch.equal(model.weight, before)
    assert all(float(state["step"]) == 0 for state in optimizer.state.values())  # AdamW's bias correction too
    model(torch.ones(1, 4)).sum().backward()
    assert step.update(torch.tensor(1.0)).finite and not torch.equal(model.weight, before)
    assert float(optimizer.state[model.weight]["step"]) == 1


def test_a_failed_checkpoint_write_keeps_the_previous_one(make_config, monkeypatch):
    """A full disk while checkpointing: a clear error, no half checkpoint, the last complete one intact."""
    import errno

    from accelerate import Accelerator

    run = train(make_config(*FAST, "train.max_steps=2", "train.checkpoint_every=2", out="run"))
    before = complete_checkpoints(run)

    def disk_full(self, output_dir=None, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", disk_full)
    with pytest.raises(OSError, match="previous checkpoint is intact.*train.resume=latest"):
        train(make_config(*FAST, "train.max_steps=4", "train.checkpoint_every=2", out="run"))
    assert complete_checkpoints(run) == before
    assert not list((run / "checkpoints").glob(".*partial"))
    monkeypatch.undo()
    resumed = train(make_config(*FAST, "train.max_steps=4", "train.checkpoint_every=2", out="run"))
    assert [row["step"] for row in logged(resumed)][-2:] == [3, 4]


def test_many_non_finite_steps_in_a_row_stop_the_run_with_advice():
    from cogft.training.metrics import MAX_CONSECUTIVE_NONFINITE, NonFiniteGuard

    guard = NonFiniteGuard(total=0)
    for step in range(MAX_CONSECUTIVE_NONFINITE - 1):
        guard.record(False, step, torch.tensor(float("nan")), torch.tensor([0]))
    guard.record(True, 99, torch.tensor(1.0), torch.tensor([0]))  # a good step resets the streak
    assert guard.total == MAX_CONSECUTIVE_NONFINITE - 1
    with pytest.raises(FloatingPointError, match="learning_rate"):
        for step in range(MAX_CONSECUTIVE_NONFINITE):
            guard.record(False, step, torch.tensor(float("nan")), torch.tensor([0]))


def test_tiny_updates_move_sft_weights_of_a_bf16_model(make_config):
    """SFT keeps fp32 master weights: an update of 1e-6 moves a bf16-family model (bf16 alone would drop it)."""
    from cogft.models.adapters import setup_trainable
    from cogft.models.loading import load_transformer, load_variant

    transformer = load_transformer("tiny://5b", load_variant("tiny://5b", "bf16"))
    params = setup_trainable(transformer, make_config("train.mode=sft"))
    weight = params[0]
    assert weight.dtype == torch.float32
    before = weight.detach().clone()
    weight.data.add_(torch.full_like(weight, 1e-6))
    typical = before.abs() > 1e-2  # weights of ordinary size, where bf16's step is far above 1e-6
    assert typical.sum() > 10 and bool((weight != before)[typical].all())
    bf16 = before.to(torch.bfloat16)
    assert torch.equal((bf16 + 1e-6)[typical], bf16[typical])  # what bf16 weights would have done


def test_one_trainer_per_output_dir_and_a_dead_ones_hold_does_not_block(make_config, shared_cache, tmp_path):
    from cogft.config import ConfigError

    out = tmp_path / "run"
    first = launch(out, shared_cache, "train.max_steps=100000", "train.checkpoint_every=2")
    wait_for_steps(out, 3, first)
    config = make_config(*FAST, "train.max_steps=3", f"output_dir={out}")
    with pytest.raises(ConfigError, match=f"output_dir {out} is in use by another running cogft train"):
        train(config)
    first.send_signal(signal.SIGKILL)
    first.wait()
    steps_before = len(logged(out))
    assert (out / ".cogft.lock").exists()  # what the killed trainer left
    resumed = train(make_config(*FAST, f"train.max_steps={steps_before + 2}", f"output_dir={out}"))
    assert [row["step"] for row in logged(resumed)] == list(range(1, steps_before + 3))


def test_a_crash_during_the_final_export_keeps_the_previous_one(make_config, monkeypatch):
    import cogft.training.checkpointing as checkpointing

    run = train(make_config(*FAST, "train.max_steps=2", "train.checkpoint_every=2", out="run"))
    before = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    real_save = checkpointing.save_lora

    def dies_half_way(transformer, config, out_dir, lora_format, model_state=None):
        if ".export.partial" not in str(out_dir):  # checkpoints write as usual
            return real_save(transformer, config, out_dir, lora_format, model_state)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "pytorch_lora_weights.safetensors").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "save_lora", dies_half_way)
    with pytest.raises(OSError):
        train(make_config(*FAST, "train.max_steps=4", "train.checkpoint_every=2", out="run"))
    after = load_file(run / "lora" / "pytorch_lora_weights.safetensors")  # whole, and still the step-2 export
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert json.loads((run / "export.json").read_text())["step"] == 2


def test_from_a_run_extended_past_its_export_takes_the_newer_checkpoint(make_config, shared_cache, tmp_path):
    from cogft.run_dir import resolve_trained

    out = tmp_path / "run"
    train(make_config(*FAST, "train.max_steps=2", "train.checkpoint_every=2", f"output_dir={out}"))
    assert resolve_trained(out).weights_dir == out / "lora"
    extended = launch(out, shared_cache, "train.max_steps=100000", "train.checkpoint_every=100000")
    wait_for_steps(out, 5, extended)
    extended.send_signal(signal.SIGINT)  # a checkpoint past step 2, and no new export
    assert extended.wait(timeout=60) == 0
    newest = complete_checkpoints(out)[-1]
    assert newest.name != "step-000002" and resolve_trained(out).weights_dir == newest


def test_a_fresh_start_moves_aside_the_rows_of_an_attempt_that_wrote_no_checkpoint(make_config):
    config = make_config(*FAST, "train.max_steps=2", "train.resume=null", out="run")
    run = Path(config.output_dir)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n{"step": 3, "loss"')
    train(config)
    assert [row["loss"] != 9.0 for row in logged(run)] == [True, True]  # only this run's rows
    (aside,) = run.glob("metrics.replaced-*.jsonl")
    assert [json.loads(line)["step"] for line in aside.read_text().splitlines()] == [1, 2]  # kept, not lost


def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_offered(make_config):
    run = train(make_config(*FAST, "train.max_steps=4", "train.checkpoint_every=2", out="run"))
    weights = run / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a disk that lost the end of the file
    previous = run / "checkpoints" / "step-000002"
    with pytest.raises(ResumeError, match=f"{weights} is truncated or changed .*train.resume={previous}"):
        train(make_config(*FAST, "train.max_steps=6", "train.checkpoint_every=2", out="run"))
    resumed = train(make_config(*FAST, "train.max_steps=6", "train.checkpoint_every=2", f"train.resume={previous}",
                                out="run"))  # taken when told: the damaged newer one does not block it
    assert [row["step"] for row in logged(resumed)] == [1, 2, 3, 4, 5, 6]
