"""Regenerate the sample clips in data/videos with the ffmpeg binary that imageio-ffmpeg ships.

Each clip is a real H.264 mp4 with distinct content and motion, 3 s at 24 fps, so frame selection
(resampling to the models' 8 fps) and resize-and-centre-crop (one clip is 16:9) are exercised.
The first frames of two clips are also written to data/images/, as image-to-video validation images.
Run: python data/make_sample_clips.py
"""

import subprocess
from pathlib import Path

import imageio_ffmpeg

HERE = Path(__file__).parent
SECONDS = 3
FPS = 24

# name -> (lavfi source graph, caption)
CLIPS = {
    "test_pattern": (
        f"testsrc2=size=720x480:rate={FPS}",
        "a test pattern with moving colour bars and a counting clock",
    ),
    "fractal_zoom": (
        f"mandelbrot=size=720x480:rate={FPS}:start_scale=2:end_scale=0.5",
        "colourful fractal patterns zooming in forever",
    ),
    "game_of_life": (
        f"life=size=90x60:rate={FPS}:mold=10:ratio=0.3:death_color=#202060:life_color=#f0d020:seed=7,scale=720:480:flags=neighbor",
        "cells growing and dying in a game of life simulation",
    ),
    "bouncing_square": (  # overlay, whose position is evaluated per frame at time t (drawbox's `t` is its thickness)
        f"color=c=#103080:size=720x480:rate={FPS}[bg];color=c=red:size=120x120:rate={FPS}[square];"
        "[bg][square]overlay=x='300+250*sin(2*PI*t/1.5)':y='200+150*abs(cos(2*PI*t/1.2))':shortest=1",
        "a red square bouncing across a blue background",
    ),
    "rotating_gradient": (
        f"gradients=size=720x480:rate={FPS}:speed=0.05:c0=#ff6000:c1=#4000ff:seed=3",
        "a spinning gradient of orange and purple hues",
    ),
    "wide_cellular": (
        f"cellauto=size=640x360:rate={FPS}:rule=110:seed=5,scale=640:360",
        "a black and white cellular automaton pattern scrolling upwards",
    ),
}


def make_clip(name: str, source: str) -> Path:
    out = HERE / "videos" / f"{name}.mp4"
    out.parent.mkdir(exist_ok=True)
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", source, "-t", str(SECONDS),
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "30", "-preset", "veryslow", str(out),
    ]
    subprocess.run(cmd, check=True)
    return out


FIRST_FRAMES = ("bouncing_square", "fractal_zoom")  # validation images of configs/tiny-i2v-lora.yaml


def write_first_frame(clip: Path) -> Path:
    out = HERE / "images" / f"{clip.stem}.jpg"
    out.parent.mkdir(exist_ok=True)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(clip),
                    "-frames:v", "1", "-q:v", "3", str(out)], check=True)
    return out


def main() -> None:
    names = sorted(CLIPS)
    for name in names:
        clip = make_clip(name, CLIPS[name][0])
        if name in FIRST_FRAMES:
            write_first_frame(clip)
    (HERE / "videos.txt").write_text("".join(f"videos/{n}.mp4\n" for n in names))
    (HERE / "prompts.txt").write_text("".join(f"{CLIPS[n][1]}\n" for n in names))


if __name__ == "__main__":
    main()
