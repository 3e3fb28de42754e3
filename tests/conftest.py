"""Shared fixtures: offline hubs, a per-session COGFT_HOME with the tiny models, configs in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session", autouse=True)
def cogft_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("cogft_home")
    os.environ["COGFT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One latent/prompt cache for the session: content-hashed, so tests can share it safely."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_config(tmp_path, shared_cache):
    """The tiny-lora config, pointed at tmp dirs, with `section.key=value` overrides."""
    from cogft.config_file import load_config

    def build(*overrides: str, base: str = "tiny-lora.yaml", out: str = "run"):
        defaults = [
            f"data.path={REPO / 'data'}",
            f"data.cache_dir={shared_cache}",
            f"output_dir={tmp_path / out}",
            "tracking.report_to=none",
        ]
        return load_config(REPO / "configs" / base, [*defaults, *overrides])

    return build


@pytest.fixture(scope="session")
def hostile_clips(tmp_path_factory) -> Path:
    """A folder of clips (each with a same-named .txt caption) that covers what users' datasets contain.

    Built once per session with the ffmpeg binary imageio-ffmpeg ships; every clip is small except
    the 4K one, which lasts 1.2 s. The names say what each file is.
    """
    import shutil
    import subprocess

    import imageio_ffmpeg

    folder = tmp_path_factory.mktemp("hostile")
    ffmpeg = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y"]
    h264 = ["-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast"]

    def lavfi(name: str, source: str, *args: str) -> Path:
        subprocess.run([*ffmpeg, "-f", "lavfi", "-i", source, *args, str(folder / name)], check=True)
        return folder / name

    lavfi("good.mp4", "testsrc2=size=160x120:rate=24", "-t", "1.5", *h264)
    lavfi("short.mp4", "testsrc2=size=160x120:rate=8", "-frames:v", "6", *h264)           # 6 frames: 5-frame bucket
    lavfi("single_frame.mp4", "testsrc2=size=160x120:rate=24", "-frames:v", "1", *h264)
    lavfi("vfr.mp4", "testsrc2=size=160x120:rate=30", "-t", "3", "-vf",                    # 30 fps for 1 s, then 6 fps
          "setpts='if(lt(N,30),N/30,1+(N-30)/6)/TB'", "-fps_mode", "vfr", *h264)
    stored = lavfi("landscape.mp4", "testsrc2=size=96x64:rate=24", "-t", "1.5", *h264)
    subprocess.run([*ffmpeg, "-display_rotation", "90", "-i", str(stored), "-c", "copy",
                    str(folder / "rotated_phone.mp4")], check=True)
    stored.unlink()
    lavfi("odd_size.mov", "testsrc2=size=720x480:rate=24", "-t", "1.5", "-vf", "scale=719:481,setsar=1",
          "-pix_fmt", "yuv444p", "-c:v", "libx264", "-preset", "ultrafast")
    lavfi("large_4k.mp4", "testsrc2=size=3840x2160:rate=10", "-t", "1.2", *h264)
    lavfi("vp9.webm", "testsrc2=size=160x120:rate=24", "-t", "1.5", "-c:v", "libvpx-vp9", "-deadline", "realtime",
          "-cpu-used", "8")
    lavfi("mpeg4.avi", "testsrc2=size=176x144:rate=24", "-t", "1.5", "-c:v", "mpeg4")
    lavfi("audio_only.mp4", "sine=frequency=440:duration=1", "-c:a", "aac")
    lavfi("crash.mp4", "testsrc2=size=128x96:rate=24", "-t", "1.5", *h264)  # tests make the decoder die on it
    whole = lavfi("whole.mp4", "testsrc2=size=160x120:rate=24", "-t", "1.5", *h264, "-movflags", "+faststart")
    (folder / "truncated.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    (folder / "zero_bytes.mp4").write_bytes(b"")
    (folder / "text_file.mp4").write_text("this is not a video\n")
    for name in ("no_caption.mp4", "empty_caption.mp4", "latin1_caption.mp4", "same_bytes_as_good.mp4"):
        shutil.copy(folder / "good.mp4", folder / name)
    for clip in folder.iterdir():
        if clip.name != "no_caption.mp4":
            clip.with_suffix(".txt").write_text(f"a clip named {clip.stem.replace('_', ' ')}\n")
    long_caption = "a test pattern with colour bars, a moving gradient and a counting clock " * 3
    (folder / "good.txt").write_text(long_caption)
    (folder / "same_bytes_as_good.txt").write_text(long_caption)
    (folder / "empty_caption.txt").write_text("  \n")
    (folder / "latin1_caption.txt").write_bytes("un café crème".encode("latin-1"))
    return folder
