"""Metrics: W&B through accelerate's tracker, plus a local metrics.jsonl that needs no account."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process

from .config import Config
from .run_dir import METRICS_FILE


def _drop_partial_last_line(path: Path) -> None:
    """A process killed mid-write leaves a line without its newline; cut it so every line parses."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class JsonlTracker(GeneralTracker):
    """Appends one JSON object per `log` call; survives a crash line by line."""

    name = "jsonl"
    requires_logging_directory = True

    @on_main_process
    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        pass  # the resolved config is written to config.yaml in the run dir

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))})
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


def trackers_for(config: Config, run_dir: Path) -> list:
    trackers: list = [JsonlTracker(config.tracking.run_name or run_dir.name, run_dir)]
    if config.tracking.report_to == "wandb":
        if config.tracking.wandb_mode and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = config.tracking.wandb_mode
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        trackers.append("wandb")
    return trackers


def source_commit() -> str | None:
    """The git commit of the cogft checkout in use, when it runs from one (an editable install)."""
    import subprocess

    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def init_trackers(accelerator, config: Config, run_dir: Path, dataset: dict) -> None:
    """`dataset`: what training sees (clips, frame buckets, windows), logged beside the config."""
    from . import __version__

    init_kwargs = {"wandb": {"name": config.tracking.run_name or run_dir.name, "dir": str(run_dir)}}
    values = {**config.model_dump(mode="json"), "dataset": dataset, "cogft_version": __version__,
              "cogft_commit": source_commit()}
    accelerator.init_trackers(config.tracking.project, config=values, init_kwargs=init_kwargs)


def log_videos(accelerator, videos: list[tuple[str, str]], step: int) -> None:
    """Send (prompt, mp4 path) pairs to W&B, when it is one of the trackers."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({"validation/videos": [wandb.Video(path, caption=prompt, format="mp4") for prompt, path in videos]}, step=step)
