"""CogVideoX's joint text+video attention through another kernel (`model.attention`, see `models/attention.py`).

At 17,776 tokens and head dim 64 attention is most of a step's arithmetic. diffusers' CogVideoX
processor calls torch's SDPA, which picks cuDNN on Hopper.

The processor below is diffusers' `CogVideoXAttnProcessor2_0` with the SDPA call replaced by a kernel on
(batch, tokens, heads, head_dim) tensors, the layout the projections produce, so no transposes are made.
The FlashAttention-4 calls are wrapped as torch custom ops, so the per-block `torch.compile` keeps each
block in one graph around them.
"""

from __future__ import annotations

import torch

from ..attention import KernelProcessor


class KernelAttnProcessor(KernelProcessor):
    """CogVideoX attention (text tokens first, then video; RoPE on the video part for the 5B variant) through
    `kernel`. Parameter names and the math are the stock processor's, so weights and LoRA files are unchanged."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError(f"model.attention={self.name} takes no attention mask (CogVideoX passes none); "
                             "use model.attention=sdpa")
        from diffusers.models.embeddings import apply_rotary_emb

        text_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (projection(hidden_states).unflatten(-1, (attn.heads, -1))
                             for projection in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, text_length:] = apply_rotary_emb(query[:, text_length:], image_rotary_emb, sequence_dim=1)
            if not attn.is_cross_attention:
                key[:, text_length:] = apply_rotary_emb(key[:, text_length:], image_rotary_emb, sequence_dim=1)
        hidden_states = self.kernel(query, key, value).flatten(2)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_length, hidden_states.size(1) - text_length], dim=1)
        return hidden_states, encoder_hidden_states
