"""What CogVideoX's layers are called where people load LoRAs in ComfyUI (`lora.export_format`).

ComfyUI's own CogVideoX model (comfy/ldm/cogvideo/model.py, in ComfyUI since April 2026) names its layers apart from
diffusers' transformer: a block's `attn1.to_q` is its `q`, `attn1.to_out.0` its `attn_out`, `ff.net.0.proj` its
`ff_proj`, and the time embedding's `linear_1` is `time_embedding_linear_1`; its LoRA loader matches keys against
those names only. kijai's ComfyUI-CogVideoXWrapper runs diffusers' own transformer (stock and Fun models), so its
kohya-style loader walks diffusers' names.
"""

from __future__ import annotations

import re

from ..lora_formats import ToolNames

_BLOCK = {"attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out",
          "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out", "norm1.linear": "norm1.linear",
          "norm2.linear": "norm2.linear"}
_OUTSIDE = {"patch_embed.proj": "patch_embed.proj", "patch_embed.text_proj": "patch_embed.text_proj",
            "time_embedding.linear_1": "time_embedding_linear_1", "time_embedding.linear_2": "time_embedding_linear_2",
            "ofs_embedding.linear_1": "ofs_embedding_linear_1", "ofs_embedding.linear_2": "ofs_embedding_linear_2",
            "norm_out.linear": "norm_out.linear", "proj_out": "proj_out"}
_IN_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def comfyui_module(name: str) -> str | None:
    """The path in ComfyUI's own CogVideoX model of diffusers' module `name`; None where it has no such layer."""
    if match := _IN_BLOCK.fullmatch(name):
        part = _BLOCK.get(match[2])
        return None if part is None else f"blocks.{match[1]}.{part}"
    return _OUTSIDE.get(name)


KEY_FORMATS = {
    "comfyui": ToolNames(comfyui_module, "ComfyUI's own CogVideoX models: ComfyUI/models/loras/, the Load LoRA node "
                                         "(LoraLoaderModelOnly)"),
    "kohya": ToolNames(lambda name: name, "kijai's ComfyUI-CogVideoXWrapper (stock and Fun models): "
                                          "ComfyUI/models/CogVideo/loras/, the CogVideo LoraSelect node"),
}
