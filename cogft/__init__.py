"""cogft: fine-tune CogVideoX video models from a folder of clips.

From a notebook: `from cogft import load_config, train, sample`, then
`run = train(load_config("configs/tiny-lora.yaml", ["train.max_steps=20"]))` and
`sample(str(run), "a prompt", "out.mp4")`. They load on first use, so `import cogft` (and the command
line's config check) stays free of torch.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cogft")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_API = {"load_config": "cogft.config_file", "train": "cogft.training.loop", "sample": "cogft.inference.sampling"}
__all__ = ["load_config", "train", "sample", "cogft_home", "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'cogft' has no attribute {name!r}")


def cogft_home():
    """Where cogft keeps what it builds and caches: $COGFT_HOME, default ~/.cache/cogft."""
    import os
    from pathlib import Path

    return Path(os.environ.get("COGFT_HOME", Path.home() / ".cache" / "cogft"))
