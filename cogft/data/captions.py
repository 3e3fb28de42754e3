"""Caption length in T5 tokens: the text encoder reads a fixed number and silently drops the rest.

Only the tokenizer is loaded (from the pipeline's `tokenizer` subfolder), so `prepare` can say per
file that a caption was truncated even when its embedding is already cached, and `cogft doctor` can
count tokens without the 9.5 GB encoder.
"""

from __future__ import annotations


def load_tokenizer(model_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    from ..models.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(model_path), subfolder="tokenizer", revision=revision)


def count_tokens(tokenizer, captions: list[str]) -> dict[str, int]:
    """Tokens per caption as the pipeline counts them (special tokens included)."""
    unique = sorted(set(captions))
    if not unique:
        return {}
    return {text: len(ids) for text, ids in zip(unique, tokenizer(unique).input_ids)}


def starts_with(caption: str, prefix: str) -> bool:
    """Whether the caption already begins with the prefix as a whole word ("sks" begins "sks, a dog", not "sksa")."""
    prefix = prefix.strip()
    return caption.startswith(prefix) and (len(caption) == len(prefix) or not caption[len(prefix)].isalnum())


def prefixed(caption: str | None, prefix: str) -> str | None:
    """`prefix` (a trigger word) in front of a caption, unless the caption already begins with it; a missing or
    empty caption stays as it is, so the clip is still skipped for it rather than trained on the trigger word alone."""
    if not prefix.strip() or not caption or starts_with(caption, prefix):
        return caption
    return f"{prefix.rstrip()} {caption}"


def validation_texts(config) -> list[str]:
    """The validation prompts as they are embedded: with `data.caption_prefix` unless `validation.prefix_prompts`
    is off."""
    prefix = config.data.caption_prefix if config.validation.prefix_prompts else ""
    return [prefixed(prompt, prefix) for prompt in config.validation.prompts]


def truncation_note(tokens: int, limit: int) -> str | None:
    if tokens <= limit:
        return None
    return f"caption truncated: {tokens} T5 tokens, the model reads the first {limit}; shorten it to keep the end"
