"""`cogft split`: long videos cut at scene changes into clips of the model's length, with the lists cogft reads.

A clip that spans a cut teaches the model that scenes jump mid-shot; a long video listed whole trains only its
first window. PySceneDetect (an optional extra) finds the cuts; each scene is then cut into clips of
`frames` frames at `fps` (a model's data.num_frames at data.fps), by the source's own frame timestamps (the
packet index the bundled ffmpeg reads, as prepare does) and re-encoded, so every clip starts on the frame the
scene starts on and holds exactly the frames cogft will sample from it.

OUT holds the clips (`clips/`), `videos.txt` + `prompts.txt` (data.path: OUT reads them) and `split.json`, the
record of where each clip came from and of the settings; a rerun with the same settings keeps every complete
clip and the captions written into prompts.txt since, and splits only what is new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..records import read_json
from .checks import Problem, file_problem
from .errors import DatasetLayoutError
from .ffmpeg_decode import FrameIndex, frame_index
from .probe import ffmpeg_exe, probe_media
from .sources import VIDEO_EXTENSIONS, Clip, _caption_beside, is_still, printable, read_clips
from .video import DecodeSpec, select_frames

logger = logging.getLogger(__name__)

RECORD = "split.json"
CLIPS = "clips"
LISTS = ("videos.txt", "prompts.txt")
# --detector: PySceneDetect's class, and the name of its threshold argument
DETECTORS = {"adaptive": ("AdaptiveDetector", "adaptive_threshold"), "content": ("ContentDetector", "threshold")}
# containers whose demuxer seeks by an index to the keyframe at or before a time (write_clip's fast seek); in others
# (MPEG-TS, MPEG-PS, FLV...) ffmpeg's seek may land after the keyframe it needs and lose frames
INDEXED = frozenset({".mp4", ".m4v", ".mov", ".3gp", ".mkv", ".webm"})
INSTALL = "pip install 'cogft[split]' (or pip install scenedetect-headless)"


@dataclass(frozen=True)
class SplitSettings:
    frames: int                # frames per clip: the model's data.num_frames
    fps: float | None          # the rate they are taken at (data.fps); None: consecutive frames at the source's rate
    stride: int                # frames (at `fps`) from one clip's start to the next one's in a scene
    min_frames: int | None     # keep a scene shorter than one clip whole when it fills this many frames; None: skip
    detector: str = "adaptive"  # PySceneDetect's AdaptiveDetector or ContentDetector
    threshold: float | None = None  # the detector's threshold; None: PySceneDetect's default
    crf: int = 17              # libx264 quality of the written clips (lower: larger, closer to the source)


@dataclass(frozen=True)
class Piece:
    """One clip to write: source frames [first, first + count) of scene `scene` (1-based)."""
    scene: int
    index: int    # 1-based within the scene
    first: int
    count: int
    start: float  # seconds, on the source's timeline (its first frame at 0 for most files)
    end: float
    needs: int    # the frames prepare must be able to take from it: the clip's, or a kept short scene's bucket


def _scenedetect():
    try:
        import scenedetect
    except ImportError as error:
        raise ConfigError(f"cogft split needs PySceneDetect, which does not import ({error}): {INSTALL}") from None
    return scenedetect


def detect_scenes(path: Path, settings: SplitSettings) -> list[tuple[int, int]]:
    """Scenes as frame ranges [start, end) of the whole video (one scene where there is no cut)."""
    scenedetect = _scenedetect()
    kind, threshold = DETECTORS[settings.detector]
    detector = getattr(scenedetect, kind)(**({} if settings.threshold is None else {threshold: settings.threshold}))
    scenes = scenedetect.detect(str(path), detector, show_progress=True, start_in_scene=True)  # a bar per video
    return [(start.frame_num, end.frame_num) for start, end in scenes]


def fills(starts: np.ndarray, end: float, frames: int, fps: float | None) -> bool:
    """Whether a clip with these frame times gives prepare `frames` frames at `fps`: its own frame selection
    decides (a source slower than `fps` keeps every frame, so it needs `frames` of them)."""
    return len(starts) > 0 and not isinstance(select_frames(starts, end, DecodeSpec((frames,), 1, 1, fps)), Problem)


def _fills(index: FrameIndex, first: int, stop: int, frames: int, fps: float | None) -> bool:
    """Whether source frames [first, stop), written as a clip, fill one: the clip's last frame lasts as long as
    the interval before it (what the muxer writes; a variable-rate source's next frame may come later)."""
    starts = index.starts[first:stop]
    if len(starts) < 2:
        return fills(starts, index.end if stop >= len(index.starts) else float(index.starts[stop]), frames, fps)
    return fills(starts, float(2 * starts[-1] - starts[-2]), frames, fps)


def _clip_end(index: FrameIndex, first: int, last: int, frames: int, fps: float | None) -> int | None:
    """Where a clip from `first` ends (at most `last`; None: it does not fit): after the frames that span
    `frames` / `fps` seconds, so back-to-back clips keep to the target rate's grid, or after more where prepare's
    selection needs them (a source slower than `fps` keeps every frame)."""
    starts = index.starts
    stop = first + frames if fps is None else int(np.searchsorted(starts, starts[first] + frames / fps * 0.999))
    stop = max(stop, first + 1)
    while stop <= last and not _fills(index, first, stop, frames, fps):
        stop += 1
    return stop if stop <= last else None


def plan_pieces(index: FrameIndex, scenes: list[tuple[int, int]], settings: SplitSettings
                ) -> tuple[list[Piece], list[tuple[int, str]]]:
    """The clips each scene is cut into, and the scenes left out with why: (scene number, reason)."""
    starts, n = index.starts, len(index.starts)
    pieces, skipped = [], []
    for number, (first, last) in enumerate(scenes, 1):
        first, last = min(first, n - 1), min(last, n)
        if last <= first:
            continue
        t0, t1 = float(starts[first]), float(starts[last]) if last < n else index.end
        start, count = first, 0
        while start < last and (stop := _clip_end(index, start, last, settings.frames, settings.fps)) is not None:
            end = float(starts[stop]) if stop < n else index.end
            count += 1
            pieces.append(Piece(number, count, start, stop - start, float(starts[start]), end, settings.frames))
            # --stride counts frames at the target rate: that share of this clip's source frames
            start += max(1, round((stop - start) * settings.stride / settings.frames))
        if count:
            continue
        if settings.min_frames is not None and _fills(index, first, last, settings.min_frames, settings.fps):
            pieces.append(Piece(number, 1, first, last - first, t0, t1, settings.min_frames))
            continue
        rate = f" at {settings.fps:g} fps" if settings.fps else ""
        why = f"scene {number} ({t0:.2f}-{t1:.2f} s) is shorter than one clip ({settings.frames} frames{rate})"
        if settings.min_frames is None:
            why += "; --keep-short keeps such scenes when they fill the shortest frame bucket"
        else:
            why += f" and than the shortest frame bucket ({settings.min_frames} frames)"
        skipped.append((number, why))
    return pieces, skipped


def write_clip(source: Path, index: FrameIndex, piece: Piece, out: Path, settings: SplitSettings) -> str | None:
    """Re-encode the piece's frames into `out`, atomically, once it holds them all and fills a clip as prepare
    reads it; None, or why it could not be written."""
    seek, graph = [], "crop=trunc(iw/2)*2:trunc(ih/2)*2"  # yuv420p needs even sizes: drop an odd last row/column
    if piece.first > 0 and source.suffix.lower() in INDEXED:
        # between the frame before and the first one: the demuxer's index finds the keyframe at or before it, and
        # ffmpeg's accurate seek drops the frames before it
        seek = ["-ss", f"{(index.starts[piece.first - 1] + index.starts[piece.first]) / 2:.6f}"]
    elif piece.first > 0:  # no index to seek by (MPEG-TS, MPEG-PS...): decoded from the start, cut by frame number
        graph = f"trim=start_frame={piece.first},setpts=PTS-STARTPTS,{graph}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *seek,
               "-i", f"file:{source.resolve()}", "-map", "0:v:0", "-an", "-sn", "-dn",
               "-frames:v", str(piece.count), "-fps_mode", "passthrough", "-vf", graph,
               "-c:v", "libx264", "-preset", "fast", "-crf", str(settings.crf), "-pix_fmt", "yuv420p",
               "-movflags", "+faststart", "-f", "mp4", f"file:{tmp}"]
    try:
        result = subprocess.run(command, capture_output=True, timeout=3600)
        if result.returncode != 0:
            error = result.stderr.decode("utf-8", errors="replace").strip().splitlines()
            return f"ffmpeg could not write it: {error[-1][:200] if error else f'exit code {result.returncode}'}"
        written = frame_index(tmp)
        frames = len(written.starts) if isinstance(written, FrameIndex) else 0
        if frames != piece.count:
            return f"ffmpeg wrote {frames} frames instead of {piece.count}"
        if not fills(written.starts, written.end, piece.needs, settings.fps):
            return (f"its {frames} frames span {written.end - written.starts[0]:.3f} s, which prepare would not take "
                    f"{piece.needs} frames from (a variable frame rate?)")
        os.replace(tmp, out)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def source_problem(path: Path) -> str | None:
    """Why a listed video cannot be split, checked as prepare checks a clip (cogft's problem codes)."""
    problem = file_problem(path)
    if problem is None and isinstance(info := probe_media(path), Problem):
        problem = info
    return None if problem is None else f"{problem.code}: {problem.detail}"


class Record:
    """OUT/split.json: the settings, each source's scenes (so a rerun does not detect again) and each clip's
    origin. Rewritten whole, atomically, after every source."""

    def __init__(self, out: Path, settings: SplitSettings) -> None:
        self.path = out / RECORD
        self.settings = asdict(settings)
        self.sources: dict[str, dict] = {}
        if self.path.exists():
            fix = f"remove {out} (or choose another OUT_FOLDER) and split again"
            old = read_json(self.path, fix, settings=dict, sources=dict)
            if old["settings"] != self.settings:
                changed = ", ".join(f"{key}: {old['settings'].get(key)} there, {value} now"
                                    for key, value in self.settings.items() if old["settings"].get(key) != value)
                raise ConfigError(f"{out} was split with other settings ({changed}); split again with the same "
                                  "settings to resume, or into a new OUT_FOLDER")
            self.sources = old["sources"]

    def save(self) -> None:
        clips = [clip for entry in self.sources.values() for clip in entry.get("clips", [])]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "clips": len(clips), "sources": self.sources},
                                  indent=1))  # ASCII: a file name that is not UTF-8 is kept as \udcNN escapes
        os.replace(tmp, self.path)


def check_out(out: Path, src: Path) -> None:
    """OUT must be new, empty or an earlier split's: clips and lists are never written over files of other kinds."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT_FOLDER {out} is a file; give a folder (it is created if missing)")
    if out.resolve() == src.resolve():
        raise ConfigError(f"OUT_FOLDER {out} is SRC_FOLDER itself; give a new folder for the clips")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD).is_file():
        raise ConfigError(f"OUT_FOLDER {out} already holds files that cogft split did not write (no {RECORD}); "
                          "give a new or empty folder")


def _lists_now(out: Path) -> dict[Path, str] | None:
    """OUT's videos.txt as it is now, with the captions the user wrote into prompts.txt since the last split, by
    clip; None before the first split."""
    if not (out / LISTS[0]).is_file():
        return None
    return {clip.video.resolve(): clip.caption or "" for clip in read_clips(out)}


def _write_lists(out: Path, record: Record, written: dict[Path, str] | None) -> tuple[int, int]:
    """videos.txt + prompts.txt from the record (line by line), atomically: (clips, of those without a caption)."""
    videos, prompts = [], []
    for entry in record.sources.values():
        for clip in entry.get("clips", []):
            videos.append(clip["clip"])
            prompts.append((written or {}).get((out / clip["clip"]).resolve()) or entry.get("caption") or "")
    for name, lines in zip(LISTS, (videos, prompts)):
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, out / name)
    return len(videos), sum(not p for p in prompts)


def _one_line(caption: str | None) -> str:
    """A caption as one line of prompts.txt (a sidecar file may hold several)."""
    return " ".join((caption or "").split())


def clip_stems(src: Path, videos: list[Path]) -> dict[Path, str]:
    """Each source's clips' name before `-sceneNNN-NN.mp4`, under `clips/`: its path in SRC without the extension,
    line breaks replaced; where two sources would share one (a.mp4 and a.mov, or files outside SRC), a hash of its
    path follows."""
    root = src.resolve()
    stems = {}
    for video in videos:
        path = video.resolve()
        relative = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        stems[video] = re.sub(r"[\r\n\t]", "_", relative.with_suffix("").as_posix())
    shared = {stem for stem, count in Counter(stems.values()).items() if count > 1}
    return {video: stem + (f"-{hashlib.sha1(os.fsencode(video.resolve())).hexdigest()[:6]}" if stem in shared else "")
            for video, stem in stems.items()}


def _split_one(out: Path, clip: Clip, stem: str, record: Record, listed: dict[Path, str] | None,
               settings: SplitSettings) -> dict:
    """Split one listed video into the record (its entry: scenes, clips, skips); returns the entry. A clip an
    earlier split wrote and the user has since taken out of videos.txt (`listed`) stays out."""
    key = str(clip.video.resolve())
    status = clip.video.stat()
    old = record.sources.get(key, {})
    same = old.get("size") == status.st_size and old.get("mtime_ns") == status.st_mtime_ns and "scenes" in old
    if old and not same:  # the source changed: its clips are cut again from the new one
        for stale in old.get("clips", []):
            (out / stale["clip"]).unlink(missing_ok=True)
    entry = {"listed_at": clip.line, "size": status.st_size, "mtime_ns": status.st_mtime_ns,
             "caption": _one_line(clip.caption), "clips": [], "skipped": [], "taken_out": []}
    index = frame_index(clip.video)
    if not isinstance(index, FrameIndex):
        entry["problem"] = f"{index.code}: {index.detail}"
        return entry
    if same:
        entry["scenes"] = old["scenes"]
    else:
        try:
            entry["scenes"] = [list(s) for s in detect_scenes(clip.video, settings)]
        except Exception as error:  # OpenCV cannot open or decode it: that source is skipped, the rest go on
            entry["problem"] = (f"scene detection failed: PySceneDetect (OpenCV) cannot read it "
                                f"({str(error).splitlines()[0][:200] if str(error) else type(error).__name__}); "
                                "re-encode it to H.264 mp4")
            return entry
    pieces, skipped = plan_pieces(index, [tuple(s) for s in entry["scenes"]], settings)
    entry["skipped"] = [{"scene": number, "reason": why} for number, why in skipped]
    taken_out = set(old.get("taken_out", [])) if same else set()
    if same and listed is not None:
        taken_out |= {c["clip"] for c in old["clips"] if (out / c["clip"]).resolve() not in listed}
    entry["taken_out"] = sorted(taken_out)
    for piece in pieces:
        name = f"{CLIPS}/{stem}-scene{piece.scene:03d}-{piece.index:02d}.mp4"
        if name in taken_out:
            continue
        if not (out / name).is_file() and (why := write_clip(clip.video, index, piece, out / name, settings)):
            entry["skipped"].append({"scene": piece.scene, "reason": f"clip {name}: {why}"})
            continue
        entry["clips"].append({"clip": name, "scene": piece.scene, "piece": piece.index, "first_frame": piece.first,
                               "frames": piece.count, "start": round(piece.start, 6), "end": round(piece.end, 6)})
    return entry


def _listed(src: Path) -> list[Clip]:
    """The videos SRC names: a folder or list as data.path reads it, or one video file (its caption beside it)."""
    if src.is_file() and src.suffix.lower() in VIDEO_EXTENSIONS:
        caption, refused = _caption_beside(src, None)
        return [Clip(src, caption, src.name, refused=refused)]
    return read_clips(src)


def split(src: str | Path, out: str | Path, settings: SplitSettings) -> dict:
    """Split every video SRC lists (any layout data.path takes) into OUT; a summary of what was done."""
    from tqdm.auto import tqdm

    src, out = Path(src), Path(out)
    if not src.exists():
        raise DatasetLayoutError(f"SRC_FOLDER {src} does not exist; give a folder of videos, a list, or a video")
    check_out(out, src)
    _scenedetect()  # a missing extra fails before any work
    logging.getLogger("pyscenedetect").setLevel(logging.WARNING)  # not a line per video over the progress bar
    out.mkdir(parents=True, exist_ok=True)
    for part in (out / CLIPS).rglob(".*.part"):  # a clip whose writer was killed (Ctrl-C removes its own)
        part.unlink(missing_ok=True)
    record = Record(out, settings)
    record.save()  # first: a split stopped before its first video is done still resumes into this folder
    lists_now = _lists_now(out)
    listed = [c for c in _listed(src) if not c.video.resolve().is_relative_to(out.resolve())]
    stems = clip_stems(src.parent if src.is_file() else src, [c.video for c in listed])
    problems: list[tuple[str, str]] = []
    bar = tqdm(listed, desc="split", unit="video")
    for clip in bar:
        why = (f"{clip.refused[0]}: {clip.refused[1]}" if clip.refused
               else "a still image: nothing to split (list it in the training data as it is)" if is_still(clip.video)
               else source_problem(clip.video))
        if why:
            problems.append((clip.line, why))
            logger.warning("%s: skipped: %s", printable(clip.line), why)
            continue
        entry = _split_one(out, clip, stems[clip.video], record, lists_now, settings)
        record.sources[str(clip.video.resolve())] = entry
        if "problem" in entry:
            problems.append((clip.line, entry["problem"]))
            logger.warning("%s: skipped: %s", printable(clip.line), entry["problem"])
        for skip in entry["skipped"]:
            logger.info("%s: %s", printable(clip.line), skip["reason"])
        record.save()
        _write_lists(out, record, lists_now)
        bar.set_postfix(clips=sum(len(e.get("clips", [])) for e in record.sources.values()))
    bar.close()
    record.save()
    clips, uncaptioned = _write_lists(out, record, lists_now)
    return {"out": str(out), "videos": len(listed), "clips": clips, "uncaptioned": uncaptioned,
            "skipped_videos": problems,
            "skipped_scenes": sum(len(e.get("skipped", [])) for e in record.sources.values()),
            "taken_out": sum(len(e.get("taken_out", [])) for e in record.sources.values())}


def summary_text(summary: dict) -> str:
    """What the command prints: the counts, the skipped videos, and what to do next."""
    out = summary["out"]
    used = summary["videos"] - len(summary["skipped_videos"])
    lines = [f"{summary['clips']} clips from {used} of {summary['videos']} videos in {out} (listed in "
             f"{out}/videos.txt; where each came from: {out}/{RECORD}); {summary['skipped_scenes']} scenes or clips "
             f"left out (why: {RECORD})"]
    lines += [f"skipped {printable(line)}: {why}" for line, why in summary["skipped_videos"]]
    if summary["taken_out"]:
        lines.append(f"{summary['taken_out']} clips taken out of videos.txt by hand stay out")
    if summary["uncaptioned"]:
        lines.append(f"{summary['uncaptioned']} clips have no caption yet: write each on its line of "
                     f"{out}/prompts.txt (line N describes the clip on line N of videos.txt); `cogft doctor {out}` "
                     "lists the lines still empty (prepare skips those clips)")
    lines.append(f"train on them with data.path: {out}")
    return "\n".join(lines)
