"""The CogVideoX training objective, as in the reference recipes (see DESIGN.md, "The objective").

    x0     = sample(latent_dist) * scaling_factor, as [B, F, C, H, W]
    x_t    = scheduler.add_noise(x0, noise, t)
    x0_hat = scheduler.get_velocity(v_hat, x_t, t)          # sqrt(a)·x_t − sqrt(1−a)·v_hat
    loss   = mean_b mean((1 / (1 − alphas_cumprod[t])) · (x0_hat − x0)²)

That is the reference; the options (`objective_options.Objective`, the `train.*` keys) change which t are drawn
(`draw_timestep`), the elementwise loss (squared or pseudo-Huber), its weighting (`loss_weights`) and, with a loss
mask, the mean (a weighted mean over the latent grid).

Image-to-video models also draw their image channels here (`draw_image_latents`, the reference recipe's
noisy image and its dropout); the loss is the same (`image_to_video.py` binds them). Random draws come from an
explicit generator so that a resumed run sees the same noise as an uninterrupted one. The loss is computed in fp32
whatever the model's precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..objective_options import REFERENCE, Objective, draw_timestep, elementwise_loss, masked_mean


@dataclass
class TrainingInputs:
    x0: torch.Tensor         # [B, F, C, H, W], fp32, scaled
    noise: torch.Tensor      # like x0
    timesteps: torch.Tensor  # [B], int64


def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A draw from a cached VAE latent distribution, as the VAE's own `sample()` makes it (log-variance clamped)."""
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps


def frames_first(latents: torch.Tensor, frame_multiple: int = 1) -> torch.Tensor:
    """Scaled VAE latents [B, C, F, H, W] as the transformer takes them, [B, F, C, H, W], with copies of the first
    frame in front up to a multiple of `frame_multiple` (see `draw_inputs`)."""
    x0 = latents.permute(0, 2, 1, 3, 4).contiguous()
    missing = -x0.shape[1] % frame_multiple
    if missing:
        x0 = torch.cat([x0[:, :1].expand(-1, missing, -1, -1, -1), x0], dim=1)
    return x0


def draw_inputs(
    latent_mean: torch.Tensor,
    latent_logvar: torch.Tensor,
    scaling_factor: float,
    num_train_timesteps: int,
    generators: Sequence[torch.Generator],
    frame_multiple: int = 1,
    objective: Objective = REFERENCE,
) -> TrainingInputs:
    """Sample x0 from the cached VAE distribution ([B, C, F, H, W]), the noise and the timesteps.

    One generator per sample, keyed by the sample's place in the global batch, so a sample's draws
    do not depend on how the batch is split over processes (2 ranks × 1 = 1 rank × 2).
    `frame_multiple` (CogVideoX 1.5's patch_size_t): x0 gets copies of its first latent frame in front
    until its frame count is a multiple, as the stock pipeline denoises one extra frame at the front;
    the padded frame stays in the loss. The timesteps follow `objective`'s sampling and range (uniform over the
    whole schedule by default, the draw this always made).
    """
    if len(generators) != latent_mean.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {latent_mean.shape[0]}")
    mean, logvar = latent_mean.float(), latent_logvar.float()
    device = mean.device

    def per_sample(draw):
        return torch.stack([draw(g) for g in generators]).to(device)

    eps = per_sample(lambda g: torch.randn(mean.shape[1:], generator=g, device=g.device))
    x0 = frames_first(sample_latent(mean, logvar, eps) * scaling_factor, frame_multiple)
    noise = per_sample(lambda g: torch.randn(x0.shape[1:], generator=g, device=g.device))
    timesteps = per_sample(lambda g: draw_timestep(g, objective, num_train_timesteps))
    return TrainingInputs(x0, noise, timesteps)


def loss_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, objective: Objective = REFERENCE) -> torch.Tensor:
    """Each sample's weight w_t on its x0 error, from ᾱ_t = alphas_cumprod[t] (fp32) and SNR_t = ᾱ_t / (1 − ᾱ_t).

    With v-prediction, x0_hat − x0 = −sqrt(1 − ᾱ_t)·(v_hat − v), so w_t·(x0_hat − x0)² = w_t·(1 − ᾱ_t)·(v_hat − v)²:
    - `reference`: w_t = 1 / (1 − ᾱ_t) = 1 + SNR_t, the reference recipes' weight: the plain v error;
    - `none`: w_t = 1, the plain x0 error (low-noise timesteps, whose x0 error is small, count less);
    - `min_snr`: w_t = min(SNR_t, γ), Min-SNR-γ (Hang et al. 2023) for an x0 loss, which on the v error is its
      v-prediction form min(SNR_t, γ) / (SNR_t + 1): low-noise timesteps capped at γ, and 0 at a zero-terminal-SNR
      schedule's last timestep (ᾱ = 0: nothing of x0 is left to predict from).
    """
    if objective.loss_weighting == "reference":
        return 1.0 / (1.0 - alphas_cumprod[t])
    if objective.loss_weighting == "none":
        return torch.ones_like(alphas_cumprod[t])
    if objective.loss_weighting == "min_snr":
        alpha = alphas_cumprod[t]
        return (alpha / (1.0 - alpha)).clamp(max=objective.min_snr_gamma)
    raise ValueError(f"unknown loss weighting {objective.loss_weighting!r}")


def diffusion_loss(*args, **kwargs) -> torch.Tensor:
    """The batch's loss: the mean of `diffusion_losses` (its arguments)."""
    return diffusion_losses(*args, **kwargs).mean()


def diffusion_losses(
    predict_velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    objective: Objective = REFERENCE,
    loss_mask: torch.Tensor | None = None,
    target_velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each sample's weighted x0 loss [B], w_t · mean(ρ(x0_hat − x0)) with ρ `objective`'s elementwise loss and w_t its
    weighting (`loss_weights`); with a `loss_mask` [B, F, 1, h, w] each sample's mean is the mask-weighted one
    (`masked_mean`). `predict_velocity(x_t, t)` runs the transformer (prompt, positions, conditions bound).
    `target_velocity(x_t, t)`: the prediction to train towards instead (a prior sample's, the base model's), whose
    x0 takes the clean latents' place; run first and without gradient."""
    x_t = scheduler.add_noise(x0, noise, t)
    if target_velocity is not None:
        with torch.no_grad():
            x0 = scheduler.get_velocity(target_velocity(x_t, t).float(), x_t, t).float()
    v_hat = predict_velocity(x_t, t).float()
    x0_hat = scheduler.get_velocity(v_hat, x_t, t)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float32)
    weights = loss_weights(alphas_cumprod, t, objective)
    per_sample = masked_mean(elementwise_loss(x0_hat.float() - x0, objective), loss_mask)
    return weights * per_sample


def draw_image_latents(image_mean: torch.Tensor, image_logvar: torch.Tensor, scale: float, frames: int,
                       dropout: float, generators: list[torch.Generator]) -> torch.Tensor:
    """The image channels of one training batch, [B, frames, C, h, w]: per sample one of the K cached encodings
    of the noisy image ([B, K, C, 1, h, w] mean/logvar), sampled, scaled as the pipeline scales it, put at latent
    frame 0 with zeros after it (the pipeline's layout, padded frames included), and zeroed whole with
    probability `dropout`. Every draw comes from the sample's generator, after the objective's own draws."""
    mean, logvar = image_mean.float(), image_logvar.float()
    draws, device = mean.shape[1], mean.device
    images = []
    for b, g in enumerate(generators):  # tensors throughout: no draw waits for the GPU
        k = torch.randint(0, draws, (1,), generator=g, device=g.device).to(device)
        eps = torch.randn(mean.shape[2:], generator=g, device=g.device).to(device)
        kept = (torch.rand((), generator=g, device=g.device) >= dropout).to(device, torch.float32)
        chosen_mean, chosen_logvar = mean[b].index_select(0, k)[0], logvar[b].index_select(0, k)[0]  # [C, 1, h, w]
        sample = sample_latent(chosen_mean, chosen_logvar, eps)
        images.append(sample[:, 0] * (scale * kept))
    latents = torch.zeros((mean.shape[0], frames, *images[0].shape), device=device)
    latents[:, 0] = torch.stack(images)
    return latents
