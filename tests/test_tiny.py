import json

import torch

from cogft.models.build import build_pipeline
from cogft.models.loading import load_variant
from cogft.models.registry import spec_named


def build_tiny_pipeline(out, short: str, seed: int = 0):
    return build_pipeline(out, spec_named(short, "tiny://"), seed=seed)


def test_tiny_families_load_through_from_pretrained(tmp_path):
    from diffusers import CogVideoXPipeline

    for family, rotary, scale, dtype in (("2b", False, 1.15258426, torch.float16), ("5b", True, 0.7, torch.bfloat16)):
        path = build_tiny_pipeline(tmp_path / family, family)
        assert json.loads((path / "model_index.json").read_text())["_class_name"] == "CogVideoXPipeline"
        pipe = CogVideoXPipeline.from_pretrained(path)
        assert pipe.transformer.config.use_rotary_positional_embeddings is rotary
        info = load_variant(str(path))
        assert (info.use_rotary, info.scaling_factor, info.dtype) == (rotary, scale, dtype)
        assert info.max_text_seq_length == pipe.transformer.config.max_text_seq_length
        # the tokenizer is a real one: different captions give different ids
        ids = pipe.tokenizer(["a red ball", "waves at sunset"], padding="max_length", max_length=16).input_ids
        assert ids[0] != ids[1] and len(set(ids[0])) > 3


def test_tiny_is_deterministic_from_seed(tmp_path):
    from safetensors.torch import load_file

    a = build_tiny_pipeline(tmp_path / "a", "2b", seed=3)
    b = build_tiny_pipeline(tmp_path / "b", "2b", seed=3)
    c = build_tiny_pipeline(tmp_path / "c", "2b", seed=4)
    weights = lambda p: load_file(next((p / "transformer").glob("*.safetensors")))
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
