"""`cogft doctor`: what prepare would say about every clip, before any encoder or GPU is involved.

The same checks as prepare (checks.py, and the frame plan of video.py) on metadata only: ffmpeg's
stream info and decord's frame index, read in worker processes, no frame decoded. Adds what helps
to clean a dataset: totals by reason, histograms of frames, duration, rate and size, caption
lengths in T5 tokens (when a config names the model) and groups of byte-identical clips.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial
from pathlib import Path

from ..config import Config, DataConfig, parse_size
from ..config_file import load_config
from ..models.family import Variant
from ..models.registry import default_variant
from .buckets import BucketBatchSampler, still_batch_sizes
from .captions import count_tokens, load_tokenizer, starts_with, truncation_note
from .checks import NO_FILE, Problem, admission_problems, byte_duplicates, caption_problem
from .images import check_validation_images, probe_sample, read_image
from .masks import check_masks, mask_problem
from .sources import Clip, data_sets, is_still, printable, read_dataset, read_set, with_trigger_words
from .triggers import contains
from .video import ClipProbe, DecodeSpec, geometry_notes, resized_size
from .workers import isolated_map

FRAME_EDGES = (1, 9, 17, 33, 49, 97, 193, 385)
SECOND_EDGES = (0, 1, 2, 4, 8, 16, 32, 64)
TOKEN_EDGES = (1, 17, 33, 65, 129, 227, 513)


def _binned(values: list[float], edges: tuple[float, ...]) -> dict[str, int]:
    """Counts per [edge, next edge) bin, labelled "a-b" (and "a+" for the last), empty bins left out."""
    counts: Counter = Counter()
    for value in values:
        index = max((i for i, edge in enumerate(edges) if value >= edge), default=0)
        label = f"{edges[index]:g}+" if index == len(edges) - 1 else f"{edges[index]:g}-{edges[index + 1]:g}"
        counts[label] += 1
    order = {label: i for i, label in enumerate(
        [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]:g}+"])}
    return dict(sorted(counts.items(), key=lambda item: order[item[0]]))


def _probe_crashed(path: str) -> ClipProbe:
    return ClipProbe(problem=Problem("decoder_crashed", "reading this file's metadata crashed a worker process"))


def _with_model(config: Config | None) -> tuple[Config | None, Variant | None, str | None]:
    """The config with its model's defaults, the model's variant, and why there is none (no config, a model
    that cannot be read here); a clip size the variant cannot take is refused by key."""
    if config is None:
        return None, None, "no config given: pass a config to count caption tokens with its model's tokenizer"
    from ..models.loading import variant_of

    try:
        variant = variant_of(config.model)
    except (OSError, ValueError) as error:
        return config, None, f"token counts skipped: cannot read the model {config.model.path}: {error}"
    config = variant.resolve(config)
    variant.check_validation_conditions(config.validation.prompts, config.validation.images,
                                        config.validation.controls)
    check_validation_images(config.validation.images)
    return config, variant, None


def _tokens(config: Config, variant: Variant, captions: list[str]) -> tuple[dict[str, int], int | None, str | None]:
    """(tokens per caption, the model's limit, why there are none)."""
    try:
        tokenizer = load_tokenizer(config.model.path, config.model.revision)
    except (OSError, ValueError) as error:
        return {}, None, f"token counts skipped: cannot load the tokenizer of {config.model.path}: {error}"
    return count_tokens(tokenizer, captions), variant.max_text_seq_length, None


UPSCALE_NOTE_FROM = 2.0  # a source scaled up more than this much trains on visibly soft frames


def _add_images(rows: list[dict], clips: list, spec: DecodeSpec) -> None:
    """Image-to-video: each clip's conditioning image, read as prepare reads it (missing, unreadable, resized to the
    clip's bucket)."""
    for clip, row in zip(clips, rows):
        row["image"] = clip.image_source
        if clip.image is None or "size" not in row:
            continue
        read = read_image(clip.image, spec.at(parse_size(row["size"])))
        if isinstance(read, Problem):
            row["problems"].append(read)
        else:
            row["notes"].extend(read[1])


def _add_masks(rows: list[dict], clips: list) -> None:
    """Each clip's loss mask, and why a listed one cannot be used before it is read (missing, empty, unreadable);
    prepare reads it and checks its shape and length."""
    for clip, row in zip(clips, rows):
        row["mask"] = str(clip.mask) if clip.mask else None
        if clip.mask is not None and (problem := mask_problem(clip.mask)):
            row["problems"].append(problem)


def _add_probes(rows: list[dict], clips: list, spec: DecodeSpec, workers: int) -> None:
    """Each readable file's metadata (in worker processes): its problems, geometry notes, frame and size bucket."""
    readable = [i for i, row in enumerate(rows) if not any(p.code in NO_FILE for p in row["problems"])]
    probes = isolated_map(partial(probe_sample, spec=spec), [str(clips[i].video) for i in readable], _probe_crashed,
                          workers=workers)
    for position, probe in probes:
        row = rows[readable[position]]
        row["source"] = probe.source()
        if probe.problem is not None:
            row["problems"].append(probe.problem)
        if probe.info is not None:
            sized = spec.at(probe.size)
            row["size"] = f"{sized.height}x{sized.width}"
            row["notes"].extend(geometry_notes(probe.info, sized))
            upscale = resized_size(probe.info.height, probe.info.width, sized)[0] / probe.info.height
            if upscale > UPSCALE_NOTE_FROM:
                row["notes"].append(f"far below the training size: scaled up {upscale:.1f}x to {sized.width}x"
                                    f"{sized.height}, so its frames train soft; use a larger source if there is one")
        if probe.selection is not None:
            row["frames"] = len(probe.selection.indices)
            row["notes"].extend(probe.selection.notes)


def _trigger_word(listed: list[Clip], caption_prefix: str, trigger: str | None = None) -> dict | None:
    """How the captions as written stand with `data.caption_prefix` and the metadata's id tokens: how many get one
    put in front, and how many begin with it already (left as they are); and how many contain `data.trigger`."""
    raw = [clip for clip in listed if clip.caption]
    prefix = caption_prefix.strip()
    tokens = sorted({token for token in [prefix, *(c.id_token for c in raw)] if token})
    if not tokens and not trigger:
        return None
    counts = {}
    if tokens:
        lacking = sum(any(not starts_with(c.caption, word) for word in (c.id_token, prefix) if word) for c in raw)
        counts = {"trigger_words": tokens, "captions_given_it": lacking, "captions_already_with_it": len(raw) - lacking}
    if trigger:
        counts.update(data_trigger=trigger, captions_containing_it=sum(contains(c.caption, trigger) for c in raw))
    return counts


def _native_notes(data: DataConfig, variant: Variant | None) -> list[str]:
    """Training sizes or a frame rate far from what the model was trained on (it adapts, slowly, at a cost)."""
    if variant is None:
        return []
    native, notes = variant.spec.native, []
    for height, width in data.sizes:
        share = height * width / (native.height * native.width)
        if not 0.5 <= share <= 2:
            notes.append(f"{height}x{width} has {share:.0%} of the pixels of {variant.name}'s native "
                         f"{native.height}x{native.width}: expect a longer adaptation, or pick a size nearer it")
    if data.fps is not None and not 0.5 <= data.fps / native.fps <= 2:
        notes.append(f"data.fps={data.fps:g} is far from {variant.name}'s native {native.fps:g} fps: motion speed "
                     "will have to be relearned")
    return notes


def _batches(rows: list[dict], config: Config | None) -> dict[str, str]:
    """The batches an epoch makes of each bucket on one process (every sample once: a remainder is a short batch)."""
    kept = [(r["frames"], *parse_size(r["size"])) for r in rows if r["verdict"] == "ok" and "frames" in r]
    if not kept:
        return {}
    batch_size, image_batch_size = (config.train.batch_size, config.data.image_batch_size) if config else (1, None)
    return BucketBatchSampler(kept, batch_size, 0, still_batch_sizes(kept, image_batch_size)).describe()


def diagnose(target: str | Path, overrides: list[str] | None = None, workers: int | None = None) -> dict:
    """The doctor's report for a config file or a dataset path (folder, .csv, .jsonl)."""
    started = time.perf_counter()
    given = str(target)  # as written: Path() would turn hf://datasets/... into hf:/datasets/...
    target = Path(target)
    config = load_config(target, overrides) if target.suffix in (".yaml", ".yml") else None
    config, variant, tokens_skipped = _with_model(config)
    if config is not None and config.data.sets:
        return _per_set(config, variant, tokens_skipped, given, workers, started)
    data = config.data if config else DataConfig(path=given)
    return _report(config, variant, tokens_skipped, data, given, workers, started)


def _per_set(config: Config, variant: Variant | None, tokens_skipped: str | None, given: str, workers: int | None,
             started: float) -> dict:
    """`data.sets`: each set's report as its own (its buckets and caption prefix), with the totals over them; every
    set's list is read (a set without clips refused by key) before any is probed."""
    sets = data_sets(config.data)
    for data_set in sets:
        read_set(data_set, with_prefix=False)
    parts = [{"set": data_set.key, "kind": "prior" if data_set.prior else "clips",
              **({"weight": data_set.weight} if data_set.weight is not None else {"repeats": data_set.repeats}),
              **_report(config.model_copy(update={"data": data_set.data}), variant, tokens_skipped, data_set.data,
                        given, workers, started)} for data_set in sets]
    return {"target": given, "sets": parts, **{key: sum(part[key] for part in parts)
                                               for key in ("clips", "ok", "would_skip")},
            "seconds": round(time.perf_counter() - started, 3)}


def _report(config: Config | None, variant: Variant | None, tokens_skipped: str | None, data: DataConfig, given: str,
            workers: int | None, started: float) -> dict:
    """The doctor's report on one source (`data`)."""
    buckets = (variant or default_variant()).frame_buckets(data.num_frames, data.shortest_bucket)
    spec = DecodeSpec(buckets, *data.sizes[0], data.fps, data.resize, sizes=data.sizes)
    listed = read_dataset(data, with_prefix=False)  # read once: the trigger-word counts need the captions as written
    clips = with_trigger_words(listed, data.caption_prefix)
    duplicates = byte_duplicates(clips)
    admission = admission_problems(clips, duplicates, variant.single_frame_problem() if variant else None)
    rows = [{"clip": str(clip.video), "listed_at": clip.line, "problems": list(admission[clip.line]), "notes": []}
            for clip in clips]
    _add_probes(rows, clips, spec, workers or data.decode_workers)
    if variant is not None and "image" in variant.conditions:
        _add_images(rows, clips, spec)
    if any(clip.mask for clip in clips):
        if variant is not None:
            check_masks(variant, clips, "data.path", data.mask_column)
        _add_masks(rows, clips)
    tokens, limit = {}, None
    if variant is not None:
        captions = [c.caption for c in clips if caption_problem(c.caption) is None]
        tokens, limit, tokens_skipped = _tokens(config, variant, captions)
    for clip, row in zip(clips, rows):
        if clip.caption in tokens:
            row["caption_tokens"] = tokens[clip.caption]
            if note := truncation_note(tokens[clip.caption], limit):
                row["notes"].append(note)

    for row in rows:
        row["verdict"] = "skip" if row["problems"] else "ok"
        row["problems"] = [{"code": p.code, "detail": p.detail} for p in row["problems"]]
    sources = [row["source"] for row in rows if row.get("source")]
    return {
        "target": given,
        "data_path": data.path,
        "settings": {"buckets": list(spec.buckets), "sizes": [f"{h}x{w}" for h, w in data.sizes], "fps": data.fps,
                     "resize": data.resize},
        "clips": len(rows),
        "ok": sum(row["verdict"] == "ok" for row in rows),
        "would_skip": sum(row["verdict"] == "skip" for row in rows),
        "problems": dict(Counter(p["code"] for row in rows for p in row["problems"]).most_common()),
        "buckets": {str(f): n for f, n in sorted(Counter(r["frames"] for r in rows if r["verdict"] == "ok").items(),
                                                 reverse=True)},
        "sizes": dict(Counter(r["size"] for r in rows if r["verdict"] == "ok").most_common()),
        "images": sum(r["verdict"] == "ok" and is_still(r["clip"]) for r in rows),
        "masks": sum(r["verdict"] == "ok" and bool(r.get("mask")) for r in rows),
        "batches": _batches(rows, config),
        "trigger": _trigger_word(listed, data.caption_prefix, data.trigger),
        "far_from_native": _native_notes(data, variant),
        "histograms": {
            "frames": _binned([s["frames"] for s in sources if s["frames"] is not None], FRAME_EDGES),
            "duration_s": _binned([s["duration"] for s in sources if s["duration"] is not None], SECOND_EDGES),
            "fps": dict(sorted(Counter(f"{s['fps']:g}" for s in sources if s["fps"]).items(),
                               key=lambda kv: float(kv[0]))),
            "size": dict(Counter(f"{s['width']}x{s['height']}" for s in sources).most_common()),
            "caption_tokens": _binned([r["caption_tokens"] for r in rows if "caption_tokens" in r], TOKEN_EDGES),
        },
        "caption_token_limit": limit,
        "captions_truncated": sum(any(n.startswith("caption truncated") for n in r["notes"]) for r in rows),
        "token_counts_skipped": tokens_skipped,
        "duplicates": duplicates,
        "seconds": round(time.perf_counter() - started, 3),
        "files": rows,
    }


def _ranges(numbers: list[int]) -> str:
    """Line numbers as short ranges: 2, 5-9, 12."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def format_table(report: dict) -> str:
    """The report for people: one line per file, then totals and histograms (with `data.sets`, per set)."""
    if "sets" in report:
        lines = [f"cogft doctor: {report['target']}: {len(report['sets'])} sets, {report['clips']} clips, "
                 f"{report['ok']} ok, {report['would_skip']} would be skipped ({report['seconds']:.1f} s)"]
        for part in report["sets"]:
            mixed = f"weight {part['weight']:g}" if "weight" in part else f"repeats {part['repeats']}"
            lines += ["", f"== {part['set']} (kind: {part['kind']}, {mixed}): {part['clips']} clips, {part['ok']} "
                          f"ok, {part['would_skip']} would be skipped ==", format_table(part)]
        return "\n".join(lines)
    rows = report["files"]
    width = max([len(r["listed_at"]) for r in rows] + [9])
    lines = [
        f"cogft doctor: {report['data_path']}: {report['clips']} clips, {report['ok']} ok, "
        f"{report['would_skip']} would be skipped ({report['seconds']:.1f} s)",
        f"settings: {report['settings']}",
        "",
        f"{'listed at':<{width}}  verdict  frames  fps    size        tokens  problems / what prepare would do",
    ]
    for r in rows:
        source = r.get("source") or {}
        size = f"{source['width']}x{source['height']}" if source else "-"
        fps = f"{source['fps']:g}" if source.get("fps") else "-"
        said = "; ".join([p["detail"] for p in r["problems"]] or r["notes"])
        lines.append(f"{r['listed_at']:<{width}}  {r['verdict']:<7}  {source.get('frames', '-')!s:>6}  {fps:<5}  "
                     f"{size:<10}  {r.get('caption_tokens', '-')!s:>6}  {said}")
    lines += ["", f"would skip, by reason: {report['problems'] or 'none'}",
              f"buckets (frames: clips): {report['buckets']}",
              f"sizes (height x width: clips): {report['sizes']}; still images: {report['images']}; with a loss "
              f"mask: {report['masks']}",
              f"batches per epoch on one process (every sample once; a bucket's remainder is a short batch): "
              f"{report['batches'] or '-'}"]
    if report["trigger"]:
        trigger = report["trigger"]
        if "trigger_words" in trigger:
            lines.append(f"trigger words {trigger['trigger_words']}: "
                         f"put in front of {trigger['captions_given_it']} captions, "
                         f"{trigger['captions_already_with_it']} begin with them already")
        if "data_trigger" in trigger:
            lines.append(f"data.trigger {trigger['data_trigger']!r}: in the captions of "
                         f"{trigger['captions_containing_it']} of the {report['clips']} listed clips (the others "
                         "train without it)")
    if empty := [int(r["listed_at"].partition(":")[2]) for r in rows if r["listed_at"].startswith("videos.txt:")
                 and any(p["code"] == "empty_caption" for p in r["problems"])]:
        lines.append(f"captions to write (empty, so prepare skips the clip): prompts.txt lines {_ranges(empty)}")
    lines += [f"far from the model's native clip: {note}" for note in report["far_from_native"]]
    for name, counts in report["histograms"].items():
        lines.append(f"{name}: " + (", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"))
    if report["caption_token_limit"]:
        lines.append(f"captions over the {report['caption_token_limit']}-token limit: {report['captions_truncated']}")
    if report["token_counts_skipped"]:
        lines.append(report["token_counts_skipped"])
    for group in report["duplicates"]:
        lines.append("same bytes: " + " = ".join(group))
    return printable("\n".join(lines))  # file names that are not UTF-8 shown with \\x escapes
