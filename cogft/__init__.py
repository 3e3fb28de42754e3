"""cogft: fine-tune CogVideoX text-to-video models from a folder of clips."""

__version__ = "0.1.0"
