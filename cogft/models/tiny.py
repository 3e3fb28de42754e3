"""Build a tiny, randomly initialised CogVideoX pipeline with the real classes.

Tests and the quickstart need a model that runs in milliseconds on a CPU yet goes through exactly the
code path of the real checkpoints: it is saved in the diffusers pipeline layout and always loaded back
with `from_pretrained`. The two families differ the way the real ones do (positions, VAE scaling,
scheduler shift), so everything family-specific is exercised.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

FAMILIES = ("2b", "5b")
TINY_SCHEME = "tiny://"

# Enough varied text for a 128-piece unigram vocabulary that still splits captions into several tokens.
_TOKENIZER_CORPUS = """\
a red ball bouncing on a wooden floor in slow motion
a cat walking across a sunny garden next to green plants
waves rolling onto a sandy beach at sunset with orange light
a city street at night with cars and bright neon signs
colourful fractal patterns zooming in forever
a test pattern with moving colour bars and a clock
cells growing and dying in a game of life simulation
a spinning gradient of blue and purple hues
rain falling on a window while lights blur in the background
a dog running through snow in a forest of tall trees
an old man reading a newspaper beside a quiet lake in autumn
children playing football on a dusty field under a cloudy sky
a hot air balloon drifting above mountains and misty valleys
a chef chopping vegetables quickly in a busy kitchen
fireworks exploding over a harbour full of boats
a butterfly landing on a yellow flower while bees buzz around
a train crossing a bridge over a deep river canyon
a woman dancing in the rain wearing a long white dress
timelapse of clouds moving over a desert with cactus shadows
a robot arm assembling small electronic parts on a table
jellyfish glowing softly in the dark blue ocean water
a skateboarder jumping over stairs in an empty plaza
"""


def tiny_dir(family: str) -> Path:
    """Where `tiny://FAMILY` lives: under $COGFT_HOME (default ~/.cache/cogft)."""
    from .. import cogft_home

    return cogft_home() / "tiny" / f"cogvideox-{family}"


def _transformer(family: str, seed: int):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=2,
        sample_width=12,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=(family == "5b"),
    )


def _vae(family: str, seed: int):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed + 1)
    return AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_height=64,
        sample_width=96,
        scaling_factor=1.15258426 if family == "2b" else 0.7,
    )


def _scheduler(family: str):
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=3.0 if family == "2b" else 1.0,
        steps_offset=0,
        timestep_spacing="trailing",
    )


def _tokenizer(workdir: Path):
    """A real sentencepiece model trained here (T5Tokenizer(vocab_file=...) alone builds a broken vocab)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    corpus = workdir / "corpus.txt"
    corpus.write_text(_TOKENIZER_CORPUS * 4)
    spm_dir = workdir / "spm"
    spm_dir.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(spm_dir / "spiece"),
        vocab_size=128,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return T5Tokenizer.from_pretrained(str(spm_dir))


def _text_encoder(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed + 2)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
    )
    return T5EncoderModel(config)


def build_tiny_pipeline(out_dir: str | os.PathLike, family: str = "2b", seed: int = 0) -> Path:
    """Write a tiny CogVideoX pipeline folder (diffusers layout) and return its path.

    Written to a temporary sibling first and renamed, so a crash never leaves a half pipeline behind.
    """
    from diffusers import CogVideoXPipeline

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_path = Path(tmp)
        tokenizer = _tokenizer(tmp_path)
        pipe = CogVideoXPipeline(
            tokenizer=tokenizer,
            text_encoder=_text_encoder(len(tokenizer), seed),
            vae=_vae(family, seed),
            transformer=_transformer(family, seed),
            scheduler=_scheduler(family),
        )
        staged = tmp_path / "pipeline"
        pipe.save_pretrained(staged)
        (staged / "cogft_tiny.json").write_text(json.dumps({"family": family, "seed": seed}))
        if out.exists():
            raise FileExistsError(f"{out} already exists; remove it or choose another --out")
        staged.rename(out)
    return out


def resolve_tiny(path: str) -> str:
    """Turn `tiny://2b` into a local pipeline folder, building it on first use."""
    if not path.startswith(TINY_SCHEME):
        return path
    family = path[len(TINY_SCHEME):]
    if family not in FAMILIES:
        raise ValueError(f"model.path {path!r}: unknown tiny family; use tiny://2b or tiny://5b")
    target = tiny_dir(family)
    if not (target / "model_index.json").exists():
        from filelock import FileLock

        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):  # ranks of one launch ask for it at the same moment
            if not (target / "model_index.json").exists():
                build_tiny_pipeline(target, family)
    return str(target)
