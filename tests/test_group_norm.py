"""The VAE's spread group norms give the stock numbers: validation videos and prepared latents stay the same."""

import copy

import pytest
import torch
from torch import nn

from cogft.models.group_norm import SpreadGroupNorm, spread_group_norms
from cogft.models.loading import load_vae, load_variant, resolve_model_path


@pytest.mark.parametrize("offset", [0.0, 3000.0])  # a large mean must not cancel the variance away
@pytest.mark.parametrize("shape", [(2, 16, 3, 10, 12), (1, 16, 7, 9)])
def test_spread_group_norm_matches_torch(shape, offset):
    torch.manual_seed(0)
    stock = nn.GroupNorm(4, 16, eps=1e-6)
    nn.init.normal_(stock.weight)
    nn.init.normal_(stock.bias)
    spread = copy.deepcopy(stock)
    assert spread_group_norms(spread) == 1 and isinstance(spread, SpreadGroupNorm)
    x = torch.randn(shape) * 2 + offset
    expected = stock(x)
    with torch.no_grad():
        torch.testing.assert_close(spread(x), expected, rtol=0, atol=1e-6 * max(offset, 1.0) * 10)
    out = spread(x)  # with autograd on, the same numbers through a fresh buffer, and gradients flow
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 * max(offset, 1.0) * 10)
    out.square().sum().backward()
    assert spread.weight.grad is not None and spread.weight.grad.abs().sum() > 0
    assert set(spread.state_dict()) == set(stock.state_dict())


def test_spread_group_norm_takes_non_contiguous_input():
    """The VAE encoder hands its norms (C, T)-transposed views."""
    torch.manual_seed(0)
    stock = nn.GroupNorm(4, 16)
    spread = copy.deepcopy(stock)
    spread_group_norms(spread)
    x = torch.randn(1, 5, 16, 6, 7).transpose(1, 2)
    assert not x.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(spread(x), stock(x), rtol=0, atol=1e-6)


def test_compiled_vae_encoder_keeps_working(make_config):
    """`data.compile_vae`: under torch.compile the norms are torch's own (the spread view/out= path broke tracing)."""
    path = make_config().model.path
    vae = load_vae(path, load_variant(path), torch.float32).eval()
    frames = torch.randn(1, 3, 9, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = vae.encode(frames).latent_dist.mean
        vae.encoder = torch.compile(vae.encoder, backend="aot_eager")  # tracing only: no C++ build on CI
        torch.testing.assert_close(vae.encode(frames).latent_dist.mean, eager, rtol=0, atol=1e-5)


def test_loaded_vae_decodes_like_the_stock_one(make_config):
    """Its group norms spread (for a GPU) and its convolutions through oneDNN (on a CPU): the stock numbers."""
    from diffusers import AutoencoderKLCogVideoX

    path = make_config().model.path
    vae = load_vae(path, load_variant(path), torch.float32).eval()
    stock = AutoencoderKLCogVideoX.from_pretrained(resolve_model_path(path), subfolder="vae").eval()
    assert any(isinstance(m, SpreadGroupNorm) for m in vae.modules())
    assert not any(isinstance(m, SpreadGroupNorm) for m in stock.modules())
    routed = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d) and "_conv_forward" in vars(m)]
    assert bool(routed) == (not torch.cuda.is_available())  # through oneDNN on a CPU machine, untouched with CUDA
    latents = torch.randn(1, vae.config.latent_channels, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(latents).sample, stock.decode(latents).sample, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spread_group_norm_rounds_once_like_torch_in_half_precision(dtype):
    torch.manual_seed(0)
    stock = nn.GroupNorm(4, 16, eps=1e-6)
    nn.init.normal_(stock.weight)
    nn.init.normal_(stock.bias)
    stock = stock.to(dtype)
    spread = copy.deepcopy(stock)
    spread_group_norms(spread)
    x = (torch.randn(2, 16, 3, 20, 24) * 2 + 5).to(dtype)
    with torch.no_grad():
        expected, out = stock(x), spread(x)
    assert out.dtype == dtype
    # one rounding of the fp32 result: the dtype's relative tolerance, and 1e-3 near zero, where x·scale and
    # the shift cancel in fp32 in a different order than torch's (x - mean)·scale
    torch.testing.assert_close(out, expected, rtol=torch.finfo(dtype).eps, atol=1e-3)
