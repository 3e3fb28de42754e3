"""Captions as training uses them: a trigger word in front of every caption (and of the validation prompts),
and caption dropout onto the empty prompt, drawn from the seeded generators."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogft.data.cache import prepare
from cogft.models.loading import load_for_config

REPO = Path(__file__).resolve().parent.parent


def test_the_caption_prefix_goes_in_front_of_every_caption_and_validation_prompt(make_config, tmp_path):
    plain_config, variant = load_for_config(make_config("validation.prompts=[a red ball]"))
    plain = prepare(plain_config, variant, torch.device("cpu"), show_progress=False)
    config, _ = load_for_config(make_config("data.caption_prefix=sks,", "validation.prompts=[a red ball]"))
    tuned = prepare(config, variant, torch.device("cpu"), show_progress=False)
    by_video = {e.video: e for e in plain.entries}
    for entry in tuned.entries:
        assert entry.caption == f"sks, {by_video[entry.video].caption}"
        assert entry.prompt != by_video[entry.video].prompt  # a new cache key: the embedded text changed
        assert load_file(entry.prompt)["prompt_embeds"].shape == load_file(by_video[entry.video].prompt)[
            "prompt_embeds"].shape
    assert [text for text, _ in tuned.validation_prompts] == ["sks, a red ball"]
    unprefixed, _ = load_for_config(make_config("data.caption_prefix=sks,", "validation.prompts=[a red ball]",
                                                "validation.prefix_prompts=false"))
    assert [t for t, _ in prepare(unprefixed, variant, torch.device("cpu"), show_progress=False).validation_prompts] \
        == ["a red ball"]


def test_an_empty_caption_is_still_skipped_behind_a_prefix(make_config, tmp_path):
    import shutil

    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("bouncing_square", "fractal_zoom"):
        shutil.copy(REPO / "data" / "videos" / f"{name}.mp4", folder)
    (folder / "bouncing_square.txt").write_text("")
    (folder / "fractal_zoom.txt").write_text("fractals")
    config, variant = load_for_config(make_config(f"data.path={folder}", "data.caption_prefix=sks",
                                                  "validation.prompts=[]"))
    report = prepare(config, variant, torch.device("cpu"), show_progress=False).report
    rows = {Path(r["clip"]).stem: r for r in report if "clip" in r}
    assert rows["bouncing_square"]["problem"] == "empty_caption"
    assert rows["fractal_zoom"]["status"] in ("encoded", "cached")


def test_caption_dropout_trains_the_fraction_it_says_on_the_empty_prompt(make_config):
    """Through the trainer's own step: of 120 samples, about the configured share see the empty prompt's embedding
    (binomial: within 4.5 standard deviations), the rest their own; none with dropout off."""
    from accelerate import Accelerator

    from cogft.data.dataset import LatentDataset, collate
    from cogft.models.loading import load_scheduler, load_transformer
    from cogft.training.assemble import assemble_step
    from cogft.training.checkpointing import sample_generators

    for fraction in (0.0, 0.3):
        config, variant = load_for_config(make_config(f"data.caption_dropout={fraction}", "validation.prompts=[]",
                                                      "model.dtype=fp32"))
        prepared = prepare(config, variant, torch.device("cpu"), show_progress=False)
        empty = load_file(prepared.negative_prompt)["prompt_embeds"]
        batch = collate([LatentDataset(prepared.entries)[i] for i in range(2)])
        transformer = load_transformer(config.model.path, variant)
        step, _, _ = assemble_step(Accelerator(cpu=True), transformer, config, variant,
                                   load_scheduler(config.model.path, variant), empty_prompt=empty)
        seen = []
        transformer.register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.append(kwargs["encoder_hidden_states"].detach()) or None,
            with_kwargs=True)
        for i in range(60):
            step.forward_backward(batch, sample_generators(config.train.seed, i, 0, 0, 2, torch.device("cpu")))
        prompts = torch.cat(seen)
        dropped = sum(torch.equal(p, empty) for p in prompts)
        kept = sum(any(torch.equal(p, own) for own in batch["prompt_embeds"]) for p in prompts)
        assert dropped + kept == 120
        spread = 4.5 * (120 * fraction * (1 - fraction)) ** 0.5
        assert abs(dropped - 120 * fraction) <= spread, (fraction, dropped)
        if fraction == 0:
            assert dropped == 0


def test_each_sample_draws_its_own_caption_dropout():
    from cogft.training.step import drop_captions

    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    embeds, empty = torch.ones(4000, 3, 2), torch.zeros(3, 2)
    share = (drop_captions(embeds, empty, 0.25, generators) == 0).all(dim=(1, 2)).float().mean().item()
    assert share == pytest.approx(0.25, abs=0.03)
