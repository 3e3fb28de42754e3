"""A tiny CogVideoX-2B that can show motion, and clips that move enough for it to show, for the motion guard's
stills experiment (tests/test_quality_motion.py).

The plain tiny 2B cannot: its random VAE keeps 1-5 % of a clip's optical flow in its latents, and from pure noise its
32-wide transformer learns the clips' colours but not where they go (the patch-embedded noise drowns its sincos
positions). So this model keeps tiny://2b's classes, configs and text encoder and changes two sets of weights:

- the VAE passes frames through: each latent pixel is the mean colour of its 8x8 pixels over 4 frames, decoded by
  upsampling (blurred in space, averaged over 3 frames in time). Each group norm's group holds a channel of constant
  value beside the colour, which makes the norm a fixed affine map that the next layer undoes (in the decoder, up
  to a shift of half the video's mean colour). A panning checkerboard keeps 86 % of its flow (1.53 of 1.77 px/frame
  at 64x96), where the random VAE keeps 1-5 %.
- the transformer's patch embedding is scaled down 50 times, so the positions dominate the noise in its input and a
  short training at the noisiest timesteps learns the layout.

It is written in the diffusers pipeline layout and loaded with from_pretrained, as every tiny model is.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

CONSTANT = 30.0  # the constant channel beside each colour in a norm group
LIFT = 6.0  # added before each SiLU, where it is nearly the identity
PATCH_SCALE = 0.02


def _route(conv, pairs, constants=(), spatial=None, temporal=None) -> None:
    """Set `conv` so that output channel o copies input channel i for (o, i) in `pairs` (the centre tap, or the
    `spatial` kernel; the last frame, or the `temporal` taps) and the `constants` channels hold CONSTANT."""
    weight = conv.weight
    weight.zero_()
    conv.bias.zero_()
    centre = torch.zeros(weight.shape[-2:])
    centre[weight.shape[-2] // 2, weight.shape[-1] // 2] = 1.0
    kernel = centre if spatial is None else spatial
    for out, inp in pairs:
        if weight.dim() == 5:
            taps = temporal or [0.0] * (weight.shape[2] - 1) + [1.0]
            for t, tap in enumerate(taps):
                weight[out, inp, t] = tap * kernel
        else:
            weight[out, inp] = kernel
    for out in constants:
        conv.bias[out] = CONSTANT


def _fixed_norm(norm, colours, group_size: int) -> None:
    """A group norm whose groups hold (colour, [-colour,] CONSTANT, zeros) gives colour + LIFT, whatever the video."""
    mean = CONSTANT / group_size
    std = math.sqrt(CONSTANT**2 / group_size - mean**2)
    for channel in colours:
        norm.weight[channel], norm.bias[channel] = std, mean + LIFT


@torch.no_grad()
def pass_frames_through(vae) -> None:
    """Set the weights of tiny://2b's AutoencoderKLCogVideoX (block_out_channels 8, 8, 16, 16; 4 norm groups; 4 latent
    channels) so that encode then decode gives back the frames, blurred: every residual block adds nothing and the
    channels carry R, G, B (and, at 16 channels, their negatives, which keep each group's mean fixed) beside
    constants."""
    for parameter in vae.parameters():
        parameter.zero_()
    rgb8, constant8 = (0, 2, 4), (1, 3, 5)  # 8 channels, groups of 2: (colour, constant)
    rgb16, negative16, constant16 = (0, 4, 8), (1, 5, 9), (2, 6, 10)  # 16 channels, groups of 4
    mean2x2 = torch.zeros(3, 3)
    mean2x2[:2, :2] = 0.25  # after the downsampler's padding of one pixel right and below
    blur = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    encoder, decoder = vae.encoder, vae.decoder

    _route(encoder.conv_in.conv, list(zip(rgb8, range(3))), constant8)
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            if resnet.in_channels != resnet.out_channels:  # 8 -> 16
                shortcut = resnet.conv_shortcut
                for out, negative, inp in zip(rgb16, negative16, rgb8):
                    shortcut.weight[out, inp], shortcut.weight[negative, inp] = 1.0, -1.0
                for out in constant16:
                    shortcut.bias[out] = CONSTANT
        if block.downsamplers is not None:
            conv = block.downsamplers[0].conv
            wide = conv.out_channels == 16
            colours = rgb16 + negative16 if wide else rgb8
            _route(conv, [(c, c) for c in colours], constant16 if wide else constant8, spatial=mean2x2)
    _fixed_norm(encoder.norm_out, rgb16, group_size=4)
    _route(encoder.conv_out.conv, list(zip(range(3), rgb16)))
    encoder.conv_out.conv.bias[:3] = -LIFT
    encoder.conv_out.conv.bias[4:] = -20.0  # the log-variance: no sampling noise to speak of

    _route(decoder.conv_in.conv, list(zip(rgb16, range(3))), constant16)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            if resnet.in_channels != resnet.out_channels:  # 16 -> 8
                shortcut = resnet.conv_shortcut
                for out, inp in zip(rgb8, rgb16):
                    shortcut.weight[out, inp] = 1.0
                for out in constant8:
                    shortcut.bias[out] = CONSTANT
        if block.upsamplers is not None:
            conv = block.upsamplers[0].conv
            wide = conv.out_channels == 16
            colours = rgb16 if wide else rgb8
            _route(conv, [(c, c) for c in colours], constant16 if wide else constant8, spatial=blur)
    _fixed_norm(decoder.norm_out.norm_layer, rgb8, group_size=2)
    decoder.norm_out.conv_y.conv.bias.fill_(1.0)  # the spatial norm's scale: 1, its shift: 0
    _route(decoder.conv_out.conv, list(zip(range(3), rgb8)), temporal=[1 / 3] * 3)
    decoder.conv_out.conv.bias[:] = -LIFT
    for module in vae.modules():  # the residual blocks' own norms: any finite weight (their output is zeroed)
        if isinstance(module, torch.nn.GroupNorm) and not module.weight.any():
            module.weight.fill_(1.0)


def build_moving_model(tiny: Path, out: Path) -> Path:
    """tiny://2b's folder `tiny` copied to `out` with the VAE passing frames through and the patch embedding scaled."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    shutil.copytree(tiny, out)
    vae = AutoencoderKLCogVideoX.from_pretrained(tiny, subfolder="vae")
    pass_frames_through(vae)
    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny, subfolder="transformer")
    with torch.no_grad():
        transformer.patch_embed.proj.weight.mul_(PATCH_SCALE)
    for name, module in (("vae", vae), ("transformer", transformer)):
        shutil.rmtree(out / name)
        module.save_pretrained(out / name)
    return out


# name -> (direction (dy, dx), two colours, caption): blobs of a 48-pixel egg-crate pattern, 3 pixels a frame
PANS = {
    "blobs_left": ((0, 1), (0.95, 0.8, 0.1), (0.1, 0.15, 0.6), "yellow and blue blobs sliding to the left"),
    "blobs_down": ((-1, 0), (0.95, 0.95, 0.95), (0.45, 0.05, 0.1), "white and red blobs sliding down"),
}


def pan_frames(direction, first, second, frames: int = 9, speed: float = 3.0, period: float = 48.0) -> np.ndarray:
    """uint8 [F, 64, 96, 3]: the pattern between the two colours moved `speed` pixels a frame along `direction`."""
    y, x = np.mgrid[0:64, 0:96].astype(np.float32)
    video = []
    for t in range(frames):
        yy, xx = y + direction[0] * speed * t, x + direction[1] * speed * t
        mix = (0.5 + 0.5 * np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period))[..., None]
        video.append(np.round((mix * np.array(first) + (1 - mix) * np.array(second)) * 255).astype(np.uint8))
    return np.stack(video)


def write_pans(folder: Path) -> tuple[Path, Path]:
    """`folder`/clips: the PANS as 8 fps mp4s (the bundled ffmpeg's H.264) with .txt captions; `folder`/stills: each
    clip's middle frame as a PNG with the same caption. Returns both folders."""
    import imageio_ffmpeg
    from PIL import Image

    clips, stills = folder / "clips", folder / "stills"
    clips.mkdir(parents=True)
    stills.mkdir()
    for name, (direction, first, second, caption) in PANS.items():
        video = pan_frames(direction, first, second)
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "rawvideo",
                        "-pix_fmt", "rgb24", "-s", "96x64", "-r", "8", "-i", "-", "-pix_fmt", "yuv420p", "-c:v",
                        "libx264", "-crf", "12", str(clips / f"{name}.mp4")], input=video.tobytes(), check=True)
        Image.fromarray(video[len(video) // 2]).save(stills / f"{name}.png")
        for where in (clips, stills):
            (where / f"{name}.txt").write_text(caption)
    return clips, stills
