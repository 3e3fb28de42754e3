"""The held-out eval loss, the best checkpoint it picks (`cogft export --best`), and the LoRA-works meter."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogft.config import ConfigError
from cogft.config_file import load_config
from cogft.data.cache import CacheEntry
from cogft.training.evaluation import clip_key, split_holdout
from cogft.training.loop import Trainer, train

REPO = Path(__file__).resolve().parent.parent
# a learning rate high enough that the eval loss moves a lot from step to step
EVAL = ["validation.prompts=[]", "eval.holdout=2", "train.checkpoint_every=1", "train.checkpoints_keep=2",
        "train.learning_rate=0.3", "train.lr_warmup_steps=0", "lora.rank=4"]
LORA = "pytorch_lora_weights.safetensors"
PROMPT = "a red square bouncing across a blue background"


def config_for(out: Path, cache: Path, *overrides: str):
    return load_config(REPO / "configs" / "tiny-lora.yaml", [
        f"data.path={REPO / 'data'}", f"data.cache_dir={cache}", f"output_dir={out}", "tracking.report_to=none",
        *EVAL, *overrides])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_rows(run_dir: Path) -> list[dict]:
    """The eval rows without what differs between two runs of the same numbers (the clock)."""
    return [{k: v for k, v in row.items() if k not in ("time", "eval/seconds")} for row in rows(run_dir)
            if "eval/loss" in row]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shared_cache):
    """4 LoRA steps, a checkpoint and an evaluation after each, two checkpoints kept (and the best), a validation
    video at the end and the export check; the clips that training fetches, the held-out ones and what the export
    check was given (the in-training frames, the embedding files), recorded."""
    import cogft.training.loop as loop
    from cogft.data.dataset import LatentDataset

    fetched, held, checked = set(), [], []
    original_get, original_split, original_check = LatentDataset.__getitem__, loop.split_holdout, loop.check_export

    def get(self, index):
        fetched.add(clip_key(self.entries[index]))
        return original_get(self, index)

    def split(*args):
        entries, held_out = original_split(*args)
        held.append({clip_key(e) for e in held_out})
        return entries, held_out

    def check(*args):
        checked.append(args)
        return original_check(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LatentDataset, "__getitem__", get)
        patch.setattr(loop, "split_holdout", split)
        patch.setattr(loop, "check_export", check)
        run = train(config_for(tmp_path_factory.mktemp("eval") / "straight", shared_cache, "train.max_steps=4",
                               f"validation.prompts=[{PROMPT}]", "validation.num_inference_steps=2",
                               "validation.check_export=true"))
    return run, fetched, held[0], checked[0]


def test_held_out_clips_are_never_trained_on(straight):
    run, fetched, held, _ = straight
    assert len(held) == 2 and len(fetched) == 4  # 4 steps of 2 clips: both epochs of the 4 left
    assert not fetched & held


def test_each_checkpoint_is_evaluated_and_the_best_survives_rotation(straight):
    from cogft.training.metric_rows import logged_steps
    from cogft.training.summary import run_summary

    run, _, _, _ = straight
    evals = eval_rows(run)
    assert [row["step"] for row in evals] == [1, 2, 3, 4]
    # 2 held-out clips: one timestep each, at 250 and 750 (the middle third has none)
    assert {"eval/loss", "eval/loss_t000_333", "eval/loss_t666_1000", "eval/loss_base",
            "eval/lora_gain", "eval/trigger_gain"} == evals[0].keys() - {"step"}
    assert len({row["eval/loss_base"] for row in evals}) == 1  # the frozen base scores the same every time
    assert all(row["eval/lora_gain"] == pytest.approx(row["eval/loss_base"] - row["eval/loss"]) for row in evals)
    assert len(logged_steps(run)) == 4  # eval rows are not step rows
    best = min(evals, key=lambda row: row["eval/loss"])
    record = json.loads((run / "best.json").read_text())
    assert record == {"step": best["step"], "eval_loss": best["eval/loss"],
                      "checkpoint": f"checkpoints/step-{best['step']:06d}"}
    recommended = json.loads((run / "recommended.json").read_text())["step"]  # spared too (quality limits)
    kept = {f"step-{step:06d}" for step in (best["step"], 3, 4, recommended) if step is not None}  # + 2 newest
    assert {p.name for p in (run / "checkpoints").iterdir()} == kept
    said = run_summary(config_for(run, run, "train.max_steps=4"), run, stopped=False)
    assert f"best {best['eval/loss']:.4f} at step {best['step']}" in said and "--best" in said
    assert "LoRA: eval loss" in said and "without" in said


def test_the_rotation_spares_the_checkpoint_best_json_names(make_config, tmp_path):
    from accelerate import Accelerator

    from cogft.training.best import best_entry, write_best
    from cogft.training.checkpointing import prune_checkpoints, save_checkpoint

    config, run = make_config(), tmp_path / "run"
    run.mkdir()
    accelerator = Accelerator(cpu=True)

    def kept_after(*steps: int) -> list[str]:
        for step in steps:
            save_checkpoint(accelerator, run, step, 1, config)
        return sorted(p.name for p in (run / "checkpoints").iterdir())

    write_best(run, best_entry(1, 0.5, "set"))
    assert kept_after(1, 2, 3) == ["step-000001", "step-000003"]
    write_best(run, best_entry(3, 0.4, "set"))
    prune_checkpoints(run, 1)  # as the trainer does once best.json names another: the old best goes
    assert kept_after() == ["step-000003"]
    assert kept_after(4) == ["step-000003", "step-000004"]
    write_best(run, None)
    assert kept_after(5) == ["step-000005"] and not (run / "best.json").exists()


def test_export_best_writes_the_best_checkpoints_weights(straight, tmp_path, capsys, caplog):
    """--best exports the checkpoint best.json names (here set to one that is not the newest), not the newest."""
    from cogft.cli import main
    from cogft.training.best import best_entry, write_best

    run = tmp_path / "run"
    shutil.copytree(straight[0], run)
    older = next(p for p in sorted((run / "checkpoints").iterdir()) if p.name != "step-000004")
    write_best(run, best_entry(int(older.name[5:]), 0.5, "set"))
    caplog.set_level(logging.INFO, logger="cogft.inference.export")
    assert main(["export", "--from", str(run), "--out", str(tmp_path / "best"), "--best"]) == 0
    exported = load_file(tmp_path / "best" / LORA)
    kept = load_file(older / LORA)
    assert exported.keys() == kept.keys()
    assert all(torch.equal(exported[k], kept[k].half()) for k in kept)  # released in the model's dtype
    # the log names the checkpoint: its weights may equal the newest's when the fp16 loss scaler skipped the steps
    # between them (the tiny run's rate is 0.3)
    assert f"weights of {older} to" in caplog.text

    assert main(["export", "--from", str(older), "--out", str(tmp_path / "x"), "--best"]) == 2
    assert "--best picks a checkpoint of a run: give --from the run directory" in capsys.readouterr().err
    no_eval = tmp_path / "no-eval"
    no_eval.mkdir()
    shutil.copy(run / "config.yaml", no_eval / "config.yaml")
    assert main(["export", "--from", str(no_eval), "--out", str(tmp_path / "y"), "--best"]) == 2
    err = capsys.readouterr().err
    assert "no best checkpoint (no best.json)" in err and "eval.holdout" in err


def test_resume_is_bit_exact_with_eval_and_forgets_a_later_best(straight, tmp_path, shared_cache, monkeypatch):
    """2 steps, stop, resume to 4 == 4 straight: training losses, eval rows, best.json, weights. A best.json naming
    a step after the resumed checkpoint (left by steps that are redone) is replaced by the checkpoint's own."""
    from cogft.training.best import best_entry, write_best

    run, _, _, _ = straight
    out = tmp_path / "resumed"
    # the first leg validates nothing (a run ending at step 2 would validate there, which the straight run does not);
    # the second validates at its end as the straight run does, so both judge their checkpoints by the same measures
    validation = (f"validation.prompts=[{PROMPT}]", "validation.num_inference_steps=2")
    train(config_for(out, shared_cache, "train.max_steps=2"))
    write_best(out, best_entry(9, 0.0, "from an abandoned trajectory"))
    at_start = []
    original = Trainer.run

    def run_recording(self):
        at_start.append(json.loads((out / "best.json").read_text())["step"])
        return original(self)

    monkeypatch.setattr(Trainer, "run", run_recording)
    resumed = train(config_for(out, shared_cache, "train.max_steps=4", *validation))
    first_leg = [row for row in eval_rows(run) if row["step"] <= 2]
    assert at_start == [min(first_leg, key=lambda row: row["eval/loss"])["step"]]
    assert [r["loss"] for r in rows(resumed) if "loss" in r] == [r["loss"] for r in rows(run) if "loss" in r]
    assert eval_rows(resumed) == eval_rows(run)
    assert (resumed / "best.json").read_text() == (run / "best.json").read_text()
    assert (resumed / "recommended.json").read_text() == (run / "recommended.json").read_text()
    a, b = load_file(run / "lora" / LORA), load_file(resumed / "lora" / LORA)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_evaluations_agree_and_an_untrained_lora_gains_nothing(tmp_path, shared_cache):
    """Fixed timesteps and noise: the same weights score the same twice. Before training the adapter's output is
    zero, so the loss with it on equals the loss with it off; the adapter stays trainable after the off pass."""
    trainer = Trainer(config_for(tmp_path / "fresh", shared_cache, "eval.every=3", "train.checkpoint_every=2",
                                 "eval.timesteps=[50, 500, 950]"))
    try:
        trainer.setup()
        trainable = [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad]
        trainer.unwrapped.train()  # as `run` sets it
        first, second = trainer.evaluation(trainer.unwrapped), trainer.evaluation(trainer.unwrapped)
        assert [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad] == trainable
        assert trainer.unwrapped.training  # back in training mode
    finally:
        trainer.accelerator.end_training()
        trainer.hold.release()
    del first["eval/seconds"], second["eval/seconds"]
    assert first == second
    assert {"eval/loss_t000_333", "eval/loss_t333_666", "eval/loss_t666_1000"} <= first.keys()
    assert first["eval/loss"] == first["eval/loss_base"] and first["eval/lora_gain"] == 0
    assert [trainer.evaluation.due(step, last=False) for step in range(1, 7)] == [False, True, True, True, False, True]


def _entries(names: list[str]) -> list[CacheEntry]:
    return [CacheEntry((f"/cache/latents/{n}.safetensors",), f"/cache/prompts/{n}.safetensors", f"{n}.mp4", n, 9, 64,
                       96) for n in names]


def test_the_held_out_clips_depend_on_the_seed_and_the_clips_not_their_order():
    entries = _entries([f"clip{i}" for i in range(20)])
    train_part, held = split_holdout(entries, 0.25, seed=42)
    assert len(held) == 5 and len(train_part) == 15
    assert {clip_key(e) for e in split_holdout(entries[::-1], 5, seed=42)[1]} == {clip_key(e) for e in held}
    assert {clip_key(e) for e in split_holdout(entries, 5, seed=43)[1]} != {clip_key(e) for e in held}
    twice = entries + [CacheEntry(e.latents, "/cache/prompts/other.safetensors", e.video, "other caption", 9, 64, 96)
                       for e in entries]  # each clip listed again with another caption: the pairs go together
    train_part, held = split_holdout(twice, 5, seed=42)
    assert len(held) == 10 and not {clip_key(e) for e in train_part} & {clip_key(e) for e in held}


def test_holding_out_too_much_is_refused_by_key(make_config):
    with pytest.raises(ConfigError, match=r"eval.holdout=6 holds out 6 of the 6 clips, leaving none to train on; "
                                          r"hold out at most 5"):
        split_holdout(_entries([f"c{i}" for i in range(6)]), 6, seed=0)
    with pytest.raises(ConfigError, match=r"eval.holdout=0.5: the dataset has 1 clip; holding clips out needs at "
                                          r"least 2"):
        split_holdout(_entries(["c0"]), 0.5, seed=0)
    for bad, said in (("1.0", "a fraction of the clips must be in (0, 1)"), ("true", "not true/false"),
                      ("-2", "must be 0 (no eval loss)")):
        with pytest.raises(ConfigError, match=r"eval\.holdout: .*" + said.replace("(", r"\(").replace(")", r"\)")):
            make_config(f"eval.holdout={bad}")
    with pytest.raises(ConfigError, match=r"eval\.timesteps: .*distinct"):
        make_config("eval.timesteps=[10, 10]")


def test_the_export_renders_like_training_in_a_fresh_process(straight):
    """The LoRA-works meter's second half: the export in a stock pipeline (another process) renders the final
    validation video to the pixel, while the adapter itself changes it a lot."""
    from cogft.training.summary import run_summary

    run, _, _, _ = straight
    checks = [row for row in rows(run) if "export_check/pixel_diff" in row]
    assert [row["step"] for row in checks] == [4]
    check = checks[0]
    assert check["export_check/match"] == 1.0
    assert check["export_check/tolerance"] == max(3 * check["export_check/prediction_noise"], 1e-5)
    assert check["export_check/prediction_gap"] <= check["export_check/tolerance"]
    assert check["export_check/prediction_lora_effect"] > 2 * check["export_check/tolerance"]  # the check can tell
    assert check["export_check/pixel_diff"] < 0.005 and check["export_check/lora_effect"] > 1  # the same kernels
    said = run_summary(config_for(run, run, "train.max_steps=4"), run, stopped=False)
    assert "export check: the export in a stock diffusers pipeline (a fresh process) predicts" in said
    assert said.count("a match") == 1 and "too little for the check" not in said


def test_an_export_that_lost_its_alpha_is_caught(straight, tmp_path, caplog):
    """The known trap: a LoRA saved without its alpha loads at alpha = rank (here half the trained scale)."""
    import logging

    from safetensors import safe_open
    from safetensors.torch import save_file

    from cogft.inference.check_export import compare, stock_render

    run, _, _, (_, frames, embeds, negative, _, probe) = straight
    broken = tmp_path / "run"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    weights = broken / "lora" / LORA
    with safe_open(str(weights), "pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle has keys() but no __iter__)
    adapter = json.loads(metadata["lora_adapter_metadata"])
    adapter["transformer.lora_alpha"] = adapter["transformer.r"]
    save_file(tensors, str(weights), metadata={**metadata, "lora_adapter_metadata": json.dumps(adapter)})
    save_file(probe, str(tmp_path / "probe.safetensors"))
    renders = stock_render(str(broken), embeds, negative, "cpu", str(tmp_path / "probe.safetensors"))
    with caplog.at_level(logging.WARNING, logger="cogft.inference.check_export"):
        metrics = compare(renders, frames, probe, "cpu")
    assert metrics["export_check/match"] == 0.0 and "beyond the tolerance" in caplog.text
    assert metrics["export_check/prediction_gap"] > 10 * metrics["export_check/tolerance"]
    assert metrics["export_check/pixel_diff"] > 0.2


def test_with_ema_the_trained_weights_decide_the_best_and_the_average_is_scored_beside(tmp_path, shared_cache):
    """A checkpoint holds the trained weights (what `--best` exports), so they are what eval/loss scores; the average,
    which the final export holds, is logged as eval/loss_ema."""
    run = train(config_for(tmp_path / "ema", shared_cache, "train.max_steps=2", "train.ema_decay=0.9"))
    evals = eval_rows(run)
    assert [row["step"] for row in evals] == [1, 2]
    assert all(row["eval/loss_ema"] != row["eval/loss"] for row in evals)  # a decay of 0.9 lags far behind
    best = json.loads((run / "best.json").read_text())
    assert best["eval_loss"] == min(row["eval/loss"] for row in evals)
