"""The objective against a hand-written reference, for both families' schedulers."""

import math

import pytest
import torch

from cogft.models.cogvideox.objective import diffusion_loss, draw_inputs


def make_scheduler(snr_shift_scale: float):
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        snr_shift_scale=snr_shift_scale, timestep_spacing="trailing",
    )


def reference_alphas_cumprod(snr_shift_scale: float) -> torch.Tensor:
    """scaled_linear betas → zero-terminal-SNR rescale → SNR shift, written out by hand."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    cumprod = torch.cumprod(alphas, 0)
    return cumprod / (snr_shift_scale + (1 - snr_shift_scale) * cumprod)


@pytest.mark.parametrize("snr_shift_scale", [3.0, 1.0], ids=["2b", "5b"])
def test_loss_matches_reference(snr_shift_scale):
    scheduler = make_scheduler(snr_shift_scale)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 4, 6, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    timesteps = torch.tensor([0, 517, 999])
    weights_v = torch.randn(4, 4, generator=gen)
    # a stand-in "transformer": any deterministic function of x_t and t
    predict = lambda x_t, t: torch.einsum("bfchw,cd->bfdhw", x_t, weights_v) + t.view(-1, 1, 1, 1, 1) / 1000

    loss = diffusion_loss(predict, scheduler, x0, noise, timesteps)

    a = reference_alphas_cumprod(snr_shift_scale).float()[timesteps].view(-1, 1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v_hat = predict(x_t, timesteps)
    x0_hat = a.sqrt() * x_t - (1 - a).sqrt() * v_hat
    per_sample = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3, 4))
    expected = (per_sample / (1 - a.view(-1))).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert loss.dtype == torch.float32


def test_draw_inputs_samples_the_cached_distribution():
    mean = torch.full((64, 4, 3, 8, 8), 0.5)
    logvar = torch.full_like(mean, math.log(0.25))  # std 0.5
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(64)]
    inputs = draw_inputs(mean, logvar, scaling_factor=2.0, num_train_timesteps=1000, generators=generators())
    assert inputs.x0.shape == (64, 3, 4, 8, 8)  # [B, F, C, H, W]
    assert abs(inputs.x0.mean().item() - 1.0) < 0.02   # 0.5 * 2
    assert abs(inputs.x0.std().item() - 1.0) < 0.02    # 0.5 * 2
    assert inputs.timesteps.min() >= 0 and inputs.timesteps.max() < 1000
    again = draw_inputs(mean, logvar, 2.0, 1000, generators())
    assert torch.equal(inputs.x0, again.x0) and torch.equal(inputs.noise, again.noise)
    assert torch.equal(inputs.timesteps, again.timesteps)
    # a sample's draws do not depend on the rest of the batch (how it is split over processes)
    alone = draw_inputs(mean[5:6], logvar[5:6], 2.0, 1000, generators()[5:6])
    assert torch.equal(alone.x0[0], inputs.x0[5]) and torch.equal(alone.timesteps[0], inputs.timesteps[5])



def test_odd_latent_frame_counts_get_the_first_frame_in_front_for_patch_size_t():
    """CogVideoX 1.5: 3 latent frames become 4, the extra one a copy of the first, in front (the side the stock
    pipeline pads and drops), and the noise covers all 4 (the padded frame is in the loss)."""
    mean, logvar = torch.randn(2, 4, 3, 8, 8), torch.zeros(2, 4, 3, 8, 8)
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(2)]
    plain = draw_inputs(mean, logvar, 0.7, 1000, generators())
    padded = draw_inputs(mean, logvar, 0.7, 1000, generators(), frame_multiple=2)
    assert padded.x0.shape == padded.noise.shape == (2, 4, 4, 8, 8)
    assert torch.equal(padded.x0[:, 1:], plain.x0) and torch.equal(padded.x0[:, 0], padded.x0[:, 1])
    even = draw_inputs(mean[:, :, :2], logvar[:, :, :2], 0.7, 1000, generators(), frame_multiple=2)
    assert even.x0.shape[1] == 2  # already a multiple: nothing added

def test_rotary_matches_pipeline(cogft_home):
    from diffusers import CogVideoXPipeline

    from cogft.models.loading import load_variant, resolve_model_path

    path = resolve_model_path("tiny://5b")
    pipe = CogVideoXPipeline.from_pretrained(path)
    ours = load_variant(path).rotary_embedding(64, 96, 3, torch.device("cpu"))
    theirs = pipe._prepare_rotary_positional_embeddings(64, 96, 3, torch.device("cpu"))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
