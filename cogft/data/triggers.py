"""Trigger words: what a LoRA's captions carry to call it up, and the same texts without them.

A clip's triggers are its set's `data.caption_prefix`, its `id_token` and `data.trigger` (a word the captions
already contain). Taken out, as whole words, they leave the caption a user would write without the trigger: the
held-out eval scores the clip with both (`eval/trigger_gain`) and `quality/bleed` predicts on both. A text that
carries none of them comes back unchanged, character for character, so "carries a trigger" is "changes here".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from functools import lru_cache

from ..config import ConfigError
from .captions import prefixed
from .sources import Clip, DataSet, data_sets

logger = logging.getLogger(__name__)


def is_trigger(word: str) -> bool:
    """Whether a prefix or token can call anything up: it holds a letter or digit (a lone "," does not)."""
    return any(c.isalnum() for c in word)


@lru_cache(maxsize=256)
def _pattern(trigger: str) -> re.Pattern:
    """`trigger` as whole words: no letter or digit may touch an end that is one ("sks" is not in "sksa")."""
    left = r"(?<!\w)" if trigger[0].isalnum() else ""
    right = r"(?!\w)" if trigger[-1].isalnum() else ""
    return re.compile(left + re.escape(trigger) + right)


def contains(text: str, trigger: str) -> bool:
    return bool(_pattern(trigger).search(text))


def clip_triggers(clip: Clip, data) -> tuple[str, ...]:
    """The triggers of one clip of a set (`data`: the set's section): prefix, id token, `data.trigger`."""
    words = (data.caption_prefix.strip(), clip.id_token.strip(), data.trigger or "")
    return tuple(word for word in dict.fromkeys(words) if is_trigger(word))


def without_triggers(text: str, triggers: Iterable[str]) -> str:
    """`text` with each trigger taken out (the longest first: "in the sks style," before "sks") and the spaces and
    commas they leave tidied; unchanged where it carries none."""
    stripped = text
    for trigger in sorted(set(triggers), key=len, reverse=True):
        stripped = _pattern(trigger).sub(" ", stripped)
    if stripped == text:
        return text
    stripped = re.sub(r"\s+", " ", stripped)
    stripped = re.sub(r" ([,.;:!?])", r"\1", stripped)
    stripped = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", stripped)
    return stripped.strip().lstrip(",;:").strip()


def run_triggers(config, listed: list[list[Clip]]) -> tuple[str, ...]:
    """Every trigger of the run: each set's prefix, `data.trigger` and every listed clip's id token."""
    words = [s.data.caption_prefix.strip() for s in data_sets(config.data)] + [config.data.trigger or ""]
    words += [clip.id_token.strip() for clips in listed for clip in clips]
    return tuple(word for word in dict.fromkeys(words) if is_trigger(word))


def bleed_texts(config, listed: list[list[Clip]]) -> list[tuple[str, str]]:
    """(with the trigger, without it) for each validation prompt that carries one once `data.caption_prefix` is in
    front of it (whether or not `validation.prefix_prompts` renders it so): what `quality/bleed` predicts on."""
    triggers = run_triggers(config, listed)
    pairs = []
    for prompt in config.validation.prompts:
        triggered = prefixed(prompt, config.data.caption_prefix)
        bare = without_triggers(triggered, triggers)
        if bare != triggered:
            pairs.append((triggered, bare))
    return pairs


def check_trigger(data_set: DataSet, clips: list[Clip]) -> None:
    """Refuse a `data.trigger` that none of a set's captions contains (a typo would make every measure of it 0);
    log how many captions lack it. A `kind: prior` set's captions are meant to lack it."""
    trigger = data_set.data.trigger
    captions = [clip.caption for clip in clips if clip.caption and clip.refused is None]
    if trigger is None or data_set.prior or not captions:
        return
    carrying = sum(contains(caption, trigger) for caption in captions)
    where = "" if data_set.key == "data" else f" of {data_set.key}"
    if not carrying:
        raise ConfigError(f"data.trigger={trigger!r}: none of the {len(captions)} captions{where} in "
                          f"{data_set.data.path} contains it as a whole word (case and all); write it into the "
                          "captions as they name the subject, or leave data.trigger out and put the word in front of "
                          "each caption with data.caption_prefix")
    if carrying < len(captions):
        logger.warning("data.trigger=%r: in %d of the %d captions%s; the other %d train without it", trigger,
                       carrying, len(captions), where, len(captions) - carrying)
