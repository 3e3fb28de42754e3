"""Several datasets in one run (`data.sets`: repeats, weights, per-set prefixes) and a prior set that keeps the base
model (`kind: prior`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from cogft.config import ConfigError
from cogft.data.buckets import BucketBatchSampler
from cogft.data.doctor import diagnose, format_table
from cogft.data.mixing import EpochMix
from cogft.data.sources import DataSet, DatasetLayoutError
from cogft.models.family import TrainingDraws
from cogft.training.clip_records import read_clips, read_samples
from cogft.training.loop import train
from cogft.training.summary import run_summary

REPO = Path(__file__).resolve().parent.parent
FAST = ["validation.prompts=[]", "train.checkpoint_every=100", "data.path=null"]


def rows(run: Path) -> list[dict]:
    """The step rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]


def losses(row: dict) -> tuple:
    return row["step"], row.get("loss"), row.get("loss/prior"), row.get("loss_smoothed")


@pytest.fixture(scope="module")
def prior_list(tmp_path_factory) -> Path:
    """Three of the sample clips again, with captions that lack the trigger word: a prior set."""
    path = tmp_path_factory.mktemp("prior") / "prior.csv"
    videos = REPO / "data" / "videos"
    path.write_text("video,caption\n" + "".join(f"{videos / name}.mp4,{caption}\n" for name, caption in (
        ("game_of_life", "a simulation"), ("test_pattern", "colour bars"), ("fractal_zoom", "a zoom"))))
    return path


def two_sets(prior_list: Path, prior: str = "prior") -> str:
    return (f"data.sets=[{{path: {REPO / 'data'}, repeats: 2, caption_prefix: 'sks, '}}, "
            f"{{path: {prior_list}, kind: {prior}, weight: 0.25, caption_prefix: ''}}]")


def mix(sizes: list[int], sets: list[DataSet], keys: list | None = None, seed: int = 7) -> EpochMix:
    sets_of = [i for i, n in enumerate(sizes) for _ in range(n)]
    return EpochMix(sets_of, keys or [(9, 64, 96)] * len(sets_of), sets, seed)


def test_repeats_and_weights_draw_in_the_stated_proportions_over_many_epochs():
    # 10 clips x 3 repeats fill 3/4 of the epoch beside a weight of 0.25 on 40 samples: 10 of them an epoch
    sampler = mix([10, 40], [DataSet("a", None, 0, repeats=3), DataSet("b", None, 1, weight=0.25)])
    drawn: Counter = Counter()
    for epoch in range(200):
        sampler.set_epoch(epoch)
        items = list(sampler)
        assert len(items) == len(sampler) == 40
        per_set = Counter(i >= 10 for i in items)
        assert per_set == {False: 30, True: 10}  # every epoch exactly, not just on average
        assert all(items.count(i) == 3 for i in range(10)) and len(set(i for i in items if i >= 10)) == 10
        drawn.update(i for i in items if i >= 10)
    assert set(drawn) == set(range(10, 50))  # a different subset each epoch: each of the 40 about 50 times
    assert max(drawn.values()) - min(drawn.values()) < 35 and abs(sum(drawn.values()) / 40 - 50) < 1e-9
    # only weights: relative shares of as many samples as the sets hold together (20 + 20 = 40: 30 and 10)
    weighted = mix([20, 20], [DataSet("a", None, 0, weight=3.0), DataSet("b", None, 1, weight=1.0)])
    assert Counter(i >= 20 for i in weighted) == {False: 30, True: 10}


def test_the_mixed_order_is_a_pure_function_of_seed_and_epoch_and_batches_keep_one_kind():
    sets = [DataSet("a", None, 0, repeats=2), DataSet("b", None, 1, weight=0.3, prior=True)]
    keys = [(9, 64, 96)] * 4 + [(9, 96, 64)] * 3 + [(9, 64, 96, "prior")] * 5 + [(1, 64, 96, "prior")] * 5
    first, second = mix([7, 10], sets, keys), mix([7, 10], sets, keys)
    first.set_epoch(3)
    order = list(first)
    for epoch in (0, 5, 3):  # another instance, after other epochs: the same epoch 3
        second.set_epoch(epoch)
        seen = list(second)
    assert seen == order and list(first) == order
    second.set_epoch(4)
    assert list(second) != order
    other_seed = mix([7, 10], sets, keys, seed=8)
    other_seed.set_epoch(3)
    assert list(other_seed) != order
    batches = BucketBatchSampler(keys, 2, 7, processes=1, mix=first)
    lengths = set()
    for epoch in range(6):  # the same batches every epoch (the resume computes its place from their count)
        batches.set_epoch(epoch)
        made = list(batches)
        lengths.add(len(made))
        assert all(len({keys[i] for i in batch}) == 1 for batch in made)  # one bucket, one kind
        assert sum(map(len, made)) == len(first) == 14 + 6
    assert lengths == {len(batches)}


def test_a_prior_samples_target_is_the_base_models_prediction(make_config):
    from cogft.bench.training import cogft_step
    from cogft.models.loading import load_for_config
    from cogft.models.modes import adapter_disabled
    from cogft.training.checkpointing import sample_generators

    config, variant = load_for_config(make_config("train.batch_size=1", "train.compile=false"))
    run = cogft_step(config, variant, torch.device("cpu"))
    step = run.step
    model = step.accelerator.unwrap_model(step.transformer)
    for name, param in model.named_parameters():  # a LoRA that changes the prediction
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    batch = variant.synthetic_batch(config, 1, 9, 64, 96, torch.Generator().manual_seed(0))
    draws = TrainingDraws(sample_generators(1, 0, 0, 0, 1, torch.device("cpu")))
    inputs = variant.draw_inputs(batch, draws, step.parts.noise_scheduler)
    x_t = step.parts.noise_scheduler.add_noise(inputs.x0, inputs.noise, inputs.timesteps)
    target = step.base_prediction(step.transformer, inputs)(x_t, inputs.timesteps)
    with adapter_disabled(model), torch.no_grad():
        base = variant.predict(model, x_t, inputs.timesteps, inputs)
    with torch.no_grad():
        tuned = variant.predict(model, x_t, inputs.timesteps, inputs)
    assert torch.equal(target, base) and not torch.allclose(target, tuned)
    assert not target.requires_grad and all(p.requires_grad for n, p in model.named_parameters() if "lora" in n)
    # the prior loss: the objective with the base model's x0 in the clean latents' place; zero once the LoRA is off
    prior_loss = step.loss(step.transformer, inputs, prior=True)
    prior_loss.backward()
    assert prior_loss > 0 and all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(param)
    assert step.loss(step.transformer, inputs, prior=True).item() == 0.0
    assert step.loss(step.transformer, inputs).item() > 0


def test_two_sets_and_a_prior_resume_bit_exactly_and_report_per_set(make_config, prior_list):
    sets = two_sets(prior_list)
    straight = train(make_config(sets, *FAST, "train.max_steps=10", out="straight"))
    train(make_config(sets, *FAST, "train.max_steps=7", out="resumed"))
    resumed = train(make_config(sets, *FAST, "train.max_steps=10", out="resumed"))
    logged = rows(straight)
    assert [losses(r) for r in logged] == [losses(r) for r in rows(resumed)]
    assert len(logged) == 10 and any("loss/prior" in r for r in logged) and any("loss" in r for r in logged)
    assert all(("loss" in r) != ("loss/prior" in r) for r in logged)  # batch size 2, one micro-batch: one kind a step
    recorded = read_samples(straight)  # the clips' per-sample losses: a prior batch's are not a clip's fit
    assert recorded == read_samples(resumed)
    assert {s.step for s in recorded} == {r["step"] for r in logged if "loss" in r}
    assert len(read_clips(straight)[1]) == 6
    summary = json.loads((straight / "prepare_report.jsonl").read_text().splitlines()[-1])["summary"]
    assert {k: (v["kind"], v["kept"]) for k, v in summary["sets"].items()} == {
        "data.sets[0]": ("clips", 6), "data.sets[1]": ("prior", 3)}
    # 6 clips x 2 repeats fill 3/4 of an epoch, the prior's weight the rest: 4 of its 3 samples (a pass and one)
    # in batches of 2 (6 + 2 steps an epoch): the resume at step 7 goes on into the next epoch's draws
    assert [r["epoch"] for r in logged] == [0] * 8 + [1] * 2
    said = run_summary(make_config(sets, *FAST, "train.max_steps=10", out="straight"), straight, False)
    assert "data.sets[0]: 6 clips (clips, repeats 2)" in said and "data.sets[1]: 3 clips (prior, weight 0.25)" in said


def test_a_clips_set_trains_towards_its_clips_where_the_prior_set_trains_towards_the_base(make_config, prior_list):
    as_prior = rows(train(make_config(two_sets(prior_list), *FAST, "train.max_steps=4", out="prior")))
    as_clips = rows(train(make_config(two_sets(prior_list, "clips"), *FAST, "train.max_steps=4", out="clips")))
    assert all("loss/prior" not in r for r in as_clips) and any("loss/prior" in r for r in as_prior)
    step = next(i for i, r in enumerate(as_prior) if "loss/prior" in r)
    assert as_prior[step]["loss/prior"] < 0.01 * as_clips[step]["loss"]  # near the base model, far from the clips


def test_bad_sets_are_refused_by_key(make_config, tmp_path, prior_list):
    def refused(*overrides: str) -> str:
        with pytest.raises((ConfigError, DatasetLayoutError)) as error:
            train(make_config(*FAST, *overrides))
        return str(error.value)

    good = f"{{path: {REPO / 'data'}}}"
    assert "data.sets[1]: repeats=2 and weight=0.5: give one" in refused(
        f"data.sets=[{good}, {{path: {prior_list}, repeats: 2, weight: 0.5}}]")
    assert "data.sets[1].colour: unknown key; allowed here: buckets, caption_prefix, kind, path, repeats, weight" in \
        refused(f"data.sets=[{good}, {{path: {prior_list}, colour: red}}]")
    assert "data.sets[1].kind: prior" in refused(f"data.sets=[{good}, {{path: {prior_list}, kind: prior}}]",
                                                 "train.mode=sft")
    assert "the weights sum to 1.2" in refused(f"data.sets=[{good}, {{path: {prior_list}, weight: 1.2}}]")
    assert "data.sets[1].weight" in refused(f"data.sets=[{good}, {{path: {prior_list}, weight: 0}}]")
    assert "every set is kind: prior" in refused(f"data.sets=[{{path: {prior_list}, kind: prior}}]")
    assert "data.path and data.sets are both given" in refused(f"data.sets=[{good}]", f"data.path={REPO / 'data'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "videos.txt").write_text("")
    (empty / "prompts.txt").write_text("")
    said = refused(f"data.sets=[{good}, {{path: {empty}}}]", "data.cache_dir=" + str(tmp_path / "untouched"))
    assert f"data.sets[1].path: {empty} has no clips" in said
    assert not (tmp_path / "untouched" / "latents").exists()  # refused before anything was encoded
    assert f"data.sets[1].path: {tmp_path / 'nope'} does not exist" in refused(
        f"data.sets=[{good}, {{path: {tmp_path / 'nope'}}}]")


def test_doctor_counts_per_set(tmp_path, prior_list):
    config = tmp_path / "sets.yaml"
    config.write_text(f"model: {{path: 'tiny://2b'}}\noutput_dir: {tmp_path / 'run'}\n"
                      "data: {num_frames: 9, height: 64, width: 96, sets: "
                      f"[{{path: {REPO / 'data'}, repeats: 2}}, {{path: {prior_list}, kind: prior, weight: 0.25}}]}}\n")
    report = diagnose(config)
    assert (report["clips"], report["ok"], report["would_skip"]) == (9, 9, 0)
    assert [(p["set"], p["kind"], p["clips"], p["ok"]) for p in report["sets"]] == [
        ("data.sets[0]", "clips", 6, 6), ("data.sets[1]", "prior", 3, 3)]
    table = format_table(report)
    assert "== data.sets[1] (kind: prior, weight 0.25): 3 clips, 3 ok, 0 would be skipped ==" in table


def test_estimate_knows_a_prior_steps_extra_forward(tmp_path, prior_list):
    from cogft.bench.estimate import format_estimate
    from cogft.config_file import load_config
    from cogft.models.cost import estimate
    from cogft.models.loading import load_variant

    fastest = ["model.attention=sdpa", "train.gradient_checkpointing=false", "train.compile=true"]
    config = load_config(REPO / "configs" / "cogvideox-5b-lora.yaml", [*fastest, "lora.rank=128", "data.path=null",
                                                                        two_sets(prior_list)])
    result = estimate(config, load_variant(config.model.path, config.model.dtype), "H100")
    # one forward more: about a third of a LoRA step without checkpointing (forward + backward of ~2 forwards)
    assert 1.25 < result.prior_seconds_per_step / result.seconds_per_step < 1.45
    assert "prior step" in format_estimate(config, result)
    sft = load_config(REPO / "configs" / "cogvideox-5b-lora.yaml", [*fastest, "train.mode=sft"])
    assert estimate(sft, load_variant(sft.model.path, sft.model.dtype), "H100").prior_seconds_per_step is None
