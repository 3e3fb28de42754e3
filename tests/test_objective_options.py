"""The objective's options (issue 29): timestep samplers and range, pseudo-Huber, the weightings, loss masks; each
against its formula, resumed bit-exactly, and bad values refused by key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cogft.config import ConfigError
from cogft.config_file import build_config
from cogft.models.cogvideox.objective import diffusion_loss, draw_inputs
from cogft.models.family import LOSS_MASK, TrainingDraws
from cogft.models.objective_options import Objective, draw_timestep
from cogft.models.registry import spec_named
from cogft.training.loop import train
from test_objective import make_scheduler, reference_alphas_cumprod

T = 1000


def draws(objective: Objective, count: int = 10_000, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([draw_timestep(generator, objective, T) for _ in range(count)])


def test_uniform_is_the_draw_the_trainer_always_made_and_a_range_is_flat_between_its_ends():
    mean, logvar = torch.randn(3, 4, 2, 4, 6), torch.zeros(3, 4, 2, 4, 6)
    drawn = draw_inputs(mean, logvar, 0.7, T, [torch.Generator().manual_seed(i) for i in range(3)])
    for i in range(3):  # x0's noise, the noise, then randint(0, T): the order and calls of before
        g = torch.Generator().manual_seed(i)
        torch.randn(mean.shape[1:], generator=g), torch.randn(drawn.x0.shape[1:], generator=g)
        assert drawn.timesteps[i] == torch.randint(0, T, (), generator=g)
    t = draws(Objective(min_timestep=100, max_timestep=299))
    assert t.min() == 100 and t.max() == 299
    counts = torch.bincount(t - 100, minlength=200).float()
    assert counts.std() / counts.mean() < 0.3  # 50 a value: flat, within its sampling noise (0.14)


@pytest.mark.parametrize("low,high", [(0, 999), (200, 799)])
def test_logit_normal_draws_are_normal_on_the_logit_scale(low, high):
    objective = Objective(timestep_sampling="logit_normal", logit_mean=0.7, logit_std=0.8, min_timestep=low,
                          max_timestep=None if high == 999 else high)
    share = (draws(objective).double() - low + 0.5) / (high - low + 1)
    logit = torch.log(share / (1 - share))
    assert abs(logit.mean().item() - 0.7) < 0.04 and abs(logit.std().item() - 0.8) < 0.04
    assert ((share > 0.5).double().mean().item()) > 0.7  # a positive mean: noisier timesteps more often


def test_mode_draws_follow_its_cumulative_distribution():
    """t/T = f(u) = 1 − u − s·(cos²(πu/2) − 1 + u) with u uniform and f decreasing: P(t ≥ k) = f⁻¹(k/T)."""
    s = 1.29
    f = lambda u: 1 - u - s * (math.cos(math.pi / 2 * u) ** 2 - 1 + u)

    def inverse(x: float) -> float:
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if f(middle) > x else (low, middle)
        return low

    t = draws(Objective(timestep_sampling="mode", mode_scale=s))
    for k in (50, 200, 400, 500, 600, 800, 950):
        assert abs((t >= k).double().mean().item() - inverse(k / T)) < 0.02, k
    middle, ends = ((t >= 450) & (t < 550)).sum().item(), ((t < 50) | (t >= 950)).sum().item()
    assert middle > 4 * ends  # the density's peak in the middle: (1 + s) / (1 + s − sπ/2) ≈ 8.7× the ends'


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_the_range_limits_hold_exactly(sampling):
    wide = Objective(timestep_sampling=sampling, logit_std=8.0, mode_scale=-1.0, min_timestep=100, max_timestep=300)
    t = draws(wide, 3000)
    assert t.dtype == torch.int64 and t.min() == 100 and t.max() == 300  # both ends trained, nothing beyond
    assert torch.equal(draws(Objective(timestep_sampling=sampling, min_timestep=500, max_timestep=500), 50),
                       torch.full((50,), 500))


def _tensors(snr_shift_scale: float = 1.0):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 4, 6, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 300, 700, 999])
    mix = torch.randn(4, 4, generator=gen)
    predict = lambda x_t, t: torch.einsum("bfchw,cd->bfdhw", x_t, mix) + t.view(-1, 1, 1, 1, 1) / 1000
    a = reference_alphas_cumprod(snr_shift_scale).float()[t].view(-1, 1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v_hat = predict(x_t, t)
    return make_scheduler(snr_shift_scale), x0, noise, t, predict, a, v_hat, a.sqrt() * x_t - (1 - a).sqrt() * v_hat


@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("weighting", ["reference", "none", "min_snr"])
def test_huber_and_each_weighting_match_their_formulas(loss, weighting):
    scheduler, x0, noise, t, predict, a, v_hat, x0_hat = _tensors()
    objective = Objective(loss=loss, huber_c=0.3, loss_weighting=weighting, min_snr_gamma=2.0)
    r, c = x0_hat - x0, 0.3
    elementwise = r**2 if loss == "mse" else 2 * c * (torch.sqrt(r**2 + c**2) - c)
    snr = a.view(-1) / (1 - a.view(-1))
    weight = {"reference": 1 / (1 - a.view(-1)), "none": torch.ones(4), "min_snr": torch.minimum(snr, torch.tensor(2.))}
    expected = (weight[weighting] * elementwise.mean(dim=(1, 2, 3, 4))).mean()
    got = diffusion_loss(predict, scheduler, x0, noise, t, objective)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    if loss == "mse" and weighting == "min_snr":  # Min-SNR's v-prediction form: min(SNR, γ) / (SNR + 1) on v's error
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        on_v = (torch.minimum(snr, torch.tensor(2.0)) / (snr + 1) * ((v_hat - v) ** 2).mean(dim=(1, 2, 3, 4))).mean()
        torch.testing.assert_close(got, on_v, rtol=1e-4, atol=1e-6)
        assert weight["min_snr"][-1] == 0  # the zero-terminal-SNR last timestep: nothing of x0 left to learn


def test_huber_is_squared_for_small_errors_and_linear_for_large_ones():
    from cogft.models.objective_options import elementwise_loss

    huber = Objective(loss="huber", huber_c=0.1)
    small, large = torch.tensor([1e-3]), torch.tensor([100.0])
    torch.testing.assert_close(elementwise_loss(small, huber), small**2, rtol=1e-3, atol=0)
    torch.testing.assert_close(elementwise_loss(large, huber), 2 * 0.1 * large - 2 * 0.1**2, rtol=1e-4, atol=0)


@pytest.mark.parametrize("objective", [Objective(), Objective(loss="huber", loss_weighting="min_snr")],
                         ids=["mse-reference", "huber-min_snr"])
def test_a_masked_out_region_gets_exactly_zero_gradient(objective):
    scheduler, x0, noise, t, _, _, _, _ = _tensors()
    t = torch.tensor([100, 300, 500, 700])
    mask = torch.ones(4, 3, 1, 6, 8)
    mask[:, :, :, :, :3] = 0      # the left of every frame out
    mask[:, 1] *= 0.25            # a frame that counts a quarter
    mask[3] = 0                   # a sample with nothing in
    v_hat = torch.randn(x0.shape, requires_grad=True)
    loss = diffusion_loss(lambda x_t, t: v_hat, scheduler, x0, noise, t, objective, mask)
    loss.backward()
    out = (mask == 0).expand_as(x0)
    assert torch.all(v_hat.grad[out] == 0) and torch.all(v_hat.grad[~out] != 0)
    # the loss does not see what is masked out, and weighs the rest by the mask (Σ m·ρ / Σ m per sample)
    changed = v_hat.detach().clone()
    changed[out] = 1e6
    assert diffusion_loss(lambda x_t, t: changed, scheduler, x0, noise, t, objective, mask) == loss
    kept = diffusion_loss(lambda x_t, t: v_hat.detach()[:3], scheduler, x0[:3], noise[:3], t[:3], objective,
                          mask[:3])
    torch.testing.assert_close(loss, kept * 3 / 4)  # the empty sample adds 0 to the batch mean
    unmasked = diffusion_loss(lambda x_t, t: v_hat.detach(), scheduler, x0, noise, t, objective, torch.ones_like(mask))
    assert unmasked == diffusion_loss(lambda x_t, t: v_hat.detach(), scheduler, x0, noise, t, objective)


def test_the_family_reads_a_cached_mask_pads_it_as_x0_and_a_zero_mask_trains_nothing():
    """CogVideoX 1.5 (patch_size_t 2): 3 latent frames become 4, the mask's too; the held-out eval's inputs carry it;
    through a real transformer, a sample whose mask is zero gives every weight exactly zero gradient, and the
    prediction's gradient is zero wherever the mask is."""
    spec = spec_named("1.5-5b", "tiny://")
    variant = spec.bind(spec.tiny, "fp32")
    c, h, w = variant.latent_channels, 4, 6
    gen = torch.Generator().manual_seed(0)
    batch = {"latent_mean": torch.randn(2, c, 3, h, w, generator=gen),
             "latent_logvar": torch.full((2, c, 3, h, w), -4.0),
             "prompt_embeds": torch.randn(2, variant.max_text_seq_length, variant.text_embed_dim, generator=gen)}
    mask = torch.ones(2, 1, 3, h, w)
    mask[0, :, 0, :, :3] = 0
    mask[1] = 0
    batch[LOSS_MASK] = mask
    scheduler = spec.diffusers_class("scheduler").from_config(spec.tiny.scheduler)
    inputs = variant.draw_inputs(batch, TrainingDraws([torch.Generator().manual_seed(i) for i in range(2)]), scheduler)
    assert inputs.loss_mask.shape == (2, 4, 1, h, w) and inputs.x0.shape[1] == 4
    assert torch.equal(inputs.loss_mask[:, 0], inputs.loss_mask[:, 1])  # the padded frame weighs as the first
    fixed = variant.fixed_inputs({k: v[:1] for k, v in batch.items()}, torch.Generator().manual_seed(0), 500)
    assert torch.equal(fixed.loss_mask, inputs.loss_mask[:1])
    with pytest.raises(ValueError, match="latent grid"):
        variant.draw_inputs({**batch, LOSS_MASK: mask[:, :, :2]}, TrainingDraws([torch.Generator()] * 2), scheduler)

    model = spec.diffusers_class("transformer").from_config(spec.tiny.transformer)
    outputs = []

    def keep(module, args, out) -> None:
        out[0].retain_grad()
        outputs.append(out[0])

    model.register_forward_hook(keep)
    variant.loss(model, inputs, scheduler).backward()
    out = (inputs.loss_mask == 0).expand_as(outputs[0])
    assert torch.all(outputs[0].grad[out] == 0) and torch.all(outputs[0].grad[~out] != 0)
    model.zero_grad()
    inputs.loss_mask = torch.zeros_like(inputs.loss_mask)
    loss = variant.loss(model, inputs, scheduler, objective=Objective(loss="huber", loss_weighting="min_snr"))
    loss.backward()
    assert loss == 0 and all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_resume_is_bit_exact_with_logit_normal_and_huber_min_snr(make_config):
    """4 steps straight == 2, stop, resume to 4; the options reach the step (the first loss is not the reference's)."""
    options = ("train.timestep_sampling=logit_normal", "train.logit_mean=0.5", "train.min_timestep=100",
               "train.max_timestep=900", "train.loss=huber", "train.huber_c=0.05", "train.loss_weighting=min_snr",
               "train.min_snr_gamma=2")
    fast = ["validation.prompts=[]", "train.checkpoint_every=100", "train.lr_warmup_steps=0"]
    straight = train(make_config(*options, *fast, "train.max_steps=4", out="straight"))
    train(make_config(*options, *fast, "train.max_steps=2", out="resumed"))
    resumed = train(make_config(*options, *fast, "train.max_steps=4", out="resumed"))
    assert len(_losses(straight)) == 4 and _losses(straight) == _losses(resumed)
    reference = train(make_config(*fast, "train.max_steps=1", out="reference"))
    assert _losses(reference)[0] != _losses(straight)[0]


def test_bad_values_are_refused_by_key_before_prepare(make_config):
    from cogft.models.loading import load_for_config

    minimal = {"model": {"path": "tiny://2b"}, "data": {"path": "data"}, "output_dir": "run"}
    with pytest.raises(ConfigError, match=r"train.min_timestep=500 is above train.max_timestep=100"):
        build_config({**minimal, "train": {"min_timestep": 500, "max_timestep": 100}})
    for key, value in (("timestep_sampling", "sigmoid"), ("loss", "l1"), ("loss_weighting", "snr"), ("logit_std", 0),
                       ("mode_scale", 1.8), ("huber_c", 0), ("min_snr_gamma", -1), ("min_timestep", -1)):
        with pytest.raises(ConfigError, match=rf"train.{key}:"):
            build_config({**minimal, "train": {key: value}})
    for key in ("max_timestep", "min_timestep"):  # the schedule is the model's: checked as it loads, before prepare
        with pytest.raises(ConfigError, match=rf"train.{key}=1000: cogvideox-2b's schedule has 1000 timesteps; "
                                              r"use 0 to 999"):
            load_for_config(make_config(f"train.{key}=1000"))
    load_for_config(make_config("train.min_timestep=999"))


def test_a_family_without_the_options_refuses_them_by_key():
    """The toy family trains its own rectified flow: any departure is refused by its key; its defaults pass."""
    from cogft.models import registry

    before = list(registry._FAMILIES)
    try:
        import toy_family

        variant = toy_family.TOY.bind(toy_family.TOY.tiny)
    finally:
        registry._FAMILIES[:] = before
    variant.check_objective(Objective(logit_mean=2.0))  # a parameter of a sampler not chosen is no departure
    for objective, key in ((Objective(timestep_sampling="mode"), "train.timestep_sampling"),
                           (Objective(max_timestep=500), "train.max_timestep"),
                           (Objective(loss_weighting="none"), "train.loss_weighting")):
        with pytest.raises(ConfigError, match=rf"{key}: toydit trains only its reference objective"):
            variant.check_objective(objective)


def test_bench_times_a_masked_step_with_the_options(make_config, monkeypatch):
    """`cogft bench --loss-mask`: the trainer's step on batches that carry a mask, with the config's options; the
    flag is refused where no training step is timed."""
    from cogft.bench.training import bench_setup, cogft_step
    from cogft.cli import main
    from cogft.models.cogvideox.spec import CogVideoXVariant

    seen = []
    loss = CogVideoXVariant.sample_losses  # what the training step calls (its mean is the step's loss)
    monkeypatch.setattr(CogVideoXVariant, "sample_losses", lambda self, model, inputs, scheduler, cast_inputs=False,
                        **kw: (seen.append((inputs.loss_mask, kw["objective"]))
                               or loss(self, model, inputs, scheduler, cast_inputs, **kw)))
    device, config, variant = bench_setup(make_config("train.batch_size=1", "train.loss=huber",
                                                      "train.timestep_sampling=mode"))
    run = cogft_step(config, variant, device)
    run.use(config.data.sizes[0], loss_mask=True)
    run(0)
    mask, objective = seen[-1]
    assert run.loss_mask and mask.shape == (1, 3, 1, 8, 12)  # 9 frames at 64x96: the latent grid, over channels
    assert objective.loss == "huber" and objective.timestep_sampling == "mode"
    assert main(["bench", "--config", "configs/tiny-lora.yaml", "--loss-mask", "--sample"]) == 2


def test_bench_pairs_a_feature_with_the_plain_step_on_one_model(capsys):
    """`cogft bench --loss-mask` / `--prior`: one JSON row for the plain step, one for the step with the feature (its
    mask flag set), and their ratio, from one model in one process."""
    from cogft.cli import main

    for flag, name in (("--loss-mask", "masked_step"), ("--prior", "prior_step")):
        assert main(["bench", "--config", "configs/tiny-lora.yaml", flag, "--warmup", "0", "--steps", "1"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert [row.get("variant", row.get("figure")) for row in rows] == ["clip_step", name, f"{name}_vs_clip_step"]
        assert [row["loss_mask"] for row in rows[:2]] == [False, flag == "--loss-mask"]
        assert rows[2]["ratio"] > 0
