"""`model.attention`: the kernel processor computes CogVideoX's attention exactly as diffusers' own, and the
choice of kernel is made (or refused) by name. The FlashAttention-4 comparison runs where a Hopper or
Blackwell GPU and the flash-attn-4 package are present."""

import pytest
import torch
import torch.nn.functional as F

from cogft.config import ConfigError
from cogft.models.attention import attention_in_use, fa4_unavailable, resolve_attention, set_attention
from cogft.models.cogvideox.attention import KernelAttnProcessor
from cogft.models.loading import load_transformer


def _fa4_ready() -> bool:
    return torch.cuda.is_available() and fa4_unavailable(torch.device("cuda"), torch.bfloat16) is None


def sdpa_on_bshd(query, key, value):
    """torch's SDPA in the processor's (batch, tokens, heads, head_dim) layout."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


def _transformer(path: str, dtype: str):
    from cogft.models.loading import load_variant

    return load_transformer(path, load_variant(path, dtype))


def _inputs(transformer, device="cpu", dtype=torch.float32, seed=0):
    """A latent [B, F, C, H, W], prompt embeddings, timesteps and (rotary family) RoPE for the tiny model."""
    from cogft.models.loading import load_variant

    cfg = transformer.config
    gen = torch.Generator().manual_seed(seed)
    frames, height, width = 3, 8, 12
    latent = torch.randn(2, frames, cfg.in_channels, height, width, generator=gen).to(device, dtype)
    text = torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, generator=gen).to(device, dtype)
    rotary = None
    if cfg.use_rotary_positional_embeddings:
        rotary = load_variant("tiny://5b").rotary_embedding(height * 8, width * 8, frames, torch.device(device))
    return dict(hidden_states=latent, encoder_hidden_states=text, timestep=torch.tensor([10, 700], device=device),
                image_rotary_emb=rotary, return_dict=False)


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_kernel_processor_matches_diffusers_attention_forward_and_backward(family):
    transformer = _transformer(f"tiny://{family}", "fp32")
    inputs = _inputs(transformer)

    def output_and_grads():
        transformer.zero_grad(set_to_none=True)
        out = transformer(**inputs)[0]
        out.square().mean().backward()
        return out.detach(), {name: p.grad.clone() for name, p in transformer.named_parameters() if "attn1" in name}

    stock, stock_grads = output_and_grads()
    transformer.set_attn_processor(KernelAttnProcessor(sdpa_on_bshd, "test"))
    ours, our_grads = output_and_grads()
    assert attention_in_use(transformer) == "test"
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)
    assert stock_grads.keys() == our_grads.keys() and any("to_q" in name for name in stock_grads)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    transformer.set_attn_processor(KernelAttnProcessor(lambda q, k, v: sdpa_on_bshd(q, k, v * 2), "doubled"))
    assert not torch.allclose(transformer(**inputs)[0], stock, atol=1e-3)  # the kernel's output is what is used


def test_attention_choice_is_made_by_name(make_config):
    transformer = _transformer("tiny://2b", "fp32")
    stock = type(next(iter(transformer.attn_processors.values())))
    cpu = torch.device("cpu")
    # no GPU here: torch's SDPA
    assert set_attention(transformer, "auto", cpu, torch.float16, KernelAttnProcessor) == "sdpa"
    assert set_attention(transformer, "sdpa", cpu, torch.float16, KernelAttnProcessor) == "sdpa"
    assert {type(p) for p in transformer.attn_processors.values()} == {stock}  # diffusers' processor untouched
    assert attention_in_use(transformer) == "sdpa"
    assert "NVIDIA GPUs" in fa4_unavailable(cpu, torch.float16)
    with pytest.raises(ConfigError, match=r"model.attention=fa4: .*NVIDIA GPUs.*model.attention=auto"):
        resolve_attention("fa4", cpu, torch.float16)
    with pytest.raises(ConfigError, match=r"model.attention.*'auto', 'sdpa' or 'fa4'"):
        make_config("model.attention=flash")


def test_fa4_is_unavailable_for_a_named_reason(monkeypatch):
    import sys
    import types

    cuda = torch.device("cuda")  # only the capability and name queries below are asked of it
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "Hopper (9.x) and Blackwell (10.x)" in fa4_unavailable(cuda, torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "fp16 or bf16" in fa4_unavailable(cuda, torch.float32)
    interface = types.ModuleType("flash_attn.cute.interface")  # a release without the entry points cogft wraps
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    assert "pip install 'cogft[fa4]'" in fa4_unavailable(cuda, torch.bfloat16)
    assert resolve_attention("auto", cuda, torch.bfloat16) == "sdpa"
    interface._flash_attn_fwd = interface._flash_attn_bwd = lambda *args, **kwargs: None
    assert fa4_unavailable(cuda, torch.bfloat16) is None
    assert resolve_attention("auto", cuda, torch.bfloat16) == "fa4"


@pytest.mark.skipif(_fa4_ready(), reason="FlashAttention-4 can run here")
def test_train_refuses_fa4_where_it_cannot_run_before_preparing(make_config, tmp_path):
    from cogft.training.loop import train

    config = make_config("model.attention=fa4", f"data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match="model.attention=fa4"):
        train(config)
    assert not (tmp_path / "cache").exists()  # refused before any clip was decoded or encoded


@pytest.mark.skipif(not _fa4_ready(), reason="needs a Hopper/Blackwell GPU and the flash-attn-4 package")
@pytest.mark.parametrize("family,dtype", [("2b", torch.float16), ("5b", torch.bfloat16)])
@pytest.mark.parametrize("compiled", [False, True])
def test_fa4_matches_sdpa_on_the_gpu(family, dtype, compiled):
    """Under the family's autocast with fp32 LoRA-like trainable weights, eager and per-block compiled."""
    from cogft.models.blocks import apply_block_options

    def run(attention):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        transformer = _transformer(f"tiny://{family}", {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]).cuda()
        transformer.transformer_blocks.requires_grad_(False)
        transformer.transformer_blocks[0].attn1.to_q.float().requires_grad_(True)
        assert set_attention(transformer, attention, torch.device("cuda"), dtype, KernelAttnProcessor) == attention
        apply_block_options(transformer, False, compiled)
        inputs = _inputs(transformer, "cuda", dtype)
        with torch.autocast("cuda", dtype=dtype):
            out = transformer(**inputs)[0]
        out.float().square().mean().backward()
        assert not torch._dynamo.utils.counters["graph_break"]  # each compiled block stays one graph around the op
        return out.float(), transformer.transformer_blocks[0].attn1.to_q.weight.grad

    out, grad = run("fa4")
    ref_out, ref_grad = run("sdpa")
    tolerance = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out, ref_out, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad, ref_grad, rtol=5 * tolerance, atol=5 * tolerance)
