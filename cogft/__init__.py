"""cogft: fine-tune CogVideoX text-to-video models from a folder of clips."""

__version__ = "0.1.0"


def cogft_home():
    """Where cogft keeps what it builds and caches: $COGFT_HOME, default ~/.cache/cogft."""
    import os
    from pathlib import Path

    return Path(os.environ.get("COGFT_HOME", Path.home() / ".cache" / "cogft"))
