"""Build a registered variant's pipeline with random weights, tiny or full size, with the real classes.

`tiny://2b` and `tiny://5b`: toy sizes that run in milliseconds on a CPU, for the tests and the
quickstart. `random://2b` and `random://5b`: the real configurations at full size (the text encoder included),
for benchmarks and end-to-end runs on a GPU with no download; random weights never make a useful
model, and the log says so. Either is saved in the diffusers pipeline layout and always loaded back
with `from_pretrained`, so it goes through exactly the code path of the real checkpoints.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..disk import follow_umask
from .family import DTYPES, VariantSpec
from .registry import spec_named

logger = logging.getLogger(__name__)
TINY_SCHEME, RANDOM_SCHEME = "tiny://", "random://"
SCHEMES = (TINY_SCHEME, RANDOM_SCHEME)
BUILT_MARKER = "cogft_built.json"

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


def built_dir(scheme: str, spec: VariantSpec) -> Path:
    """Where `tiny://SHORT` / `random://SHORT` lives: under $COGFT_HOME (default ~/.cache/cogft)."""
    from .. import cogft_home

    return cogft_home() / scheme.removesuffix("://") / spec.name


def tiny_dir(short: str) -> Path:
    return built_dir(TINY_SCHEME, spec_named(short, TINY_SCHEME))


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


@contextmanager
def random_init(device: torch.device, dtype: torch.dtype):
    """Build modules straight on `device` in `dtype`: no fp32 host copy of billions of random weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def text_encoder_from_config(spec: VariantSpec, config: dict):
    """The spec's text encoder (a transformers model) with random weights, from its config dict."""
    encoder_class = spec.diffusers_class("text_encoder")
    return encoder_class(encoder_class.config_class(**config))


def _components(spec: VariantSpec, full_size: bool, seed: int, vocab_size: int, device: torch.device,
                dtype: torch.dtype) -> dict:
    """Transformer, VAE, text encoder and scheduler from the spec's configs, random weights built on `device`;
    a tiny text encoder gets the tokenizer's vocabulary."""
    configs = spec.reference if full_size else spec.tiny
    text_config = configs.text_encoder if full_size else {**configs.text_encoder, "vocab_size": vocab_size}
    with random_init(device, dtype):
        torch.manual_seed(seed)
        transformer = spec.diffusers_class("transformer").from_config(configs.transformer)
        torch.manual_seed(seed + 1)
        vae = spec.diffusers_class("vae").from_config(configs.vae)
        torch.manual_seed(seed + 2)
        text_encoder = text_encoder_from_config(spec, text_config)
    scheduler = spec.diffusers_class("scheduler").from_config(configs.scheduler)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def build_pipeline(out_dir: str | os.PathLike, spec: VariantSpec, full_size: bool = False, seed: int = 0) -> Path:
    """Write a random-weight pipeline folder (diffusers layout) of `spec` and return its path.

    Tiny: fp32 on the CPU. Full size: the spec's dtype, built on the GPU when there is one. Written to a
    temporary sibling first and renamed, so a crash never leaves a half pipeline behind.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    cuda = full_size and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[spec.dtype] if full_size else torch.float32
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_path = Path(tmp)
        tokenizer = _tokenizer(tmp_path)
        components = _components(spec, full_size, seed, len(tokenizer), device, dtype)
        pipe = spec.diffusers_class("pipeline")(tokenizer=tokenizer, **components)
        staged = tmp_path / "pipeline"
        pipe.save_pretrained(staged)
        del pipe, components
        (staged / BUILT_MARKER).write_text(json.dumps({"variant": spec.name, "full_size": full_size, "seed": seed}))
        follow_umask(staged)  # safetensors writes 0600
        staged.rename(out)
    return out


@functools.cache
def _warn_random(path: str, name: str) -> None:
    """Once per process: the path is resolved by every stage that loads a component."""
    logger.warning("model.path %s: a full-size %s with RANDOM weights, for benchmarks and end-to-end checks; "
                   "it learns nothing useful, never train with it for real", path, name)


def resolve_built(path: str) -> str:
    """`tiny://2b`, `random://5b`, ... become a local pipeline folder, built on first use; other paths pass."""
    scheme = next((s for s in SCHEMES if path.startswith(s)), None)
    if scheme is None:
        return path
    spec = spec_named(path[len(scheme):], scheme)
    target = built_dir(scheme, spec)
    if scheme == RANDOM_SCHEME:
        _warn_random(path, spec.name)
    if not (target / "model_index.json").exists():
        from filelock import FileLock

        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):  # ranks of one launch ask for it at the same moment
            if not (target / "model_index.json").exists():
                if scheme == RANDOM_SCHEME:
                    logger.info("building %s once under %s (T5-XXL included: several GB of disk)", path, target)
                build_pipeline(target, spec, full_size=scheme == RANDOM_SCHEME)
    return str(target)
