"""Metrics: W&B or TensorBoard through accelerate's trackers, plus a local metrics.jsonl that needs no account."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from accelerate.tracking import GeneralTracker, TensorBoardTracker, on_main_process

from .config import Config, ConfigError
from .records import damaged, is_kind
from .run_dir import METRICS_FILE, TENSORBOARD_DIR, WANDB_ID_FILE

logger = logging.getLogger(__name__)
_WANDB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what `wandb_run_id` writes, or a user's own id


def _drop_partial_last_line(path: Path) -> None:
    """A process killed mid-write leaves a line without its newline; cut it so every line parses."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def continue_metrics(run_dir: Path, resumed_step: int | None) -> None:
    """Make metrics.jsonl read as one run: a resume redoes the steps after its checkpoint, so their rows go
    (they come back, the same, as they are redone); a fresh start in a folder whose earlier attempt wrote rows
    but no checkpoint moves those rows aside to metrics.replaced-TIME.jsonl."""
    path = run_dir / METRICS_FILE
    _drop_partial_last_line(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    if resumed_step is None:
        aside = path.with_name(f"metrics.replaced-{int(time.time())}.jsonl")
        path.rename(aside)
        logger.warning("%s held rows of an earlier attempt that wrote no checkpoint; moved to %s", path, aside.name)
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)  # a damaged row goes, as below
    kept = [line for line in lines if _step_of(line) <= resumed_step]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        logger.info("metrics.jsonl: %d rows after step %d dropped; those steps are redone", len(lines) - len(kept),
                    resumed_step)


def _step_of(line: str) -> float:
    """A metrics row's step; a row that does not parse or has no whole-number step (a damaged file) sorts after every
    step, so it goes."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return float("inf")
    return step if is_kind(step, int) else float("inf")


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


def _last_logged_step(run_dir: Path) -> int | None:
    """The step of metrics.jsonl's last row, or None when it has none."""
    path = run_dir / METRICS_FILE
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    step = _step_of(lines[-1]) if lines else None
    return None if step is None or step == float("inf") else int(step)


def _flat(values: dict, prefix: str = "") -> dict:
    """A nested config as the flat scalars and strings TensorBoard's hparams take: {"train.learning_rate": 1e-4,
    "lora.target_modules": "['to_q', ...]"}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            plain = value is None or isinstance(value, (bool, int, float, str))
            flat[f"{prefix}{key}"] = value if plain else str(value)
    return flat


def cut_events(folder: Path, first_dropped: int) -> None:
    """Remove the summaries of steps >= `first_dropped` from every TensorBoard event file under `folder` (and a
    record cut short by a kill), rewriting the files that change. `purge_step` alone only asks readers to hide
    them: TensorBoard's Python reader does, but the files keep both copies of each redone step for any other."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(folder.rglob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())  # up to a record cut short or damaged
        events = [Event.FromString(record) for record in records]
        kept = [(r, e) for r, e in zip(records, events) if not e.HasField("summary") or e.step < first_dropped]
        try:
            if not any(event.HasField("summary") for _, event in kept):
                path.unlink()  # nothing of the run left in it (a fresh start, or a file of the redone steps only)
                continue
            if len(kept) == len(records) and path.stat().st_size == sum(len(r) + 16 for r in records):
                continue
            tmp = path.with_name(f".{path.name}.tmp")
            with tmp.open("wb") as handle:
                writer = RecordWriter(handle)
                for record, _ in kept:
                    writer.write(record)
            os.replace(tmp, path)
        except OSError as error:  # the run goes on; only the view of the redone steps suffers
            logger.warning("TensorBoard: could not cut the redone steps from %s (%s); its curves may show them "
                           "twice", path, error)
    for sub in sorted(folder.glob("*/"), reverse=True):  # accelerate's hparams folders, emptied above
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()


class TensorBoardRun(TensorBoardTracker):
    """accelerate's TensorBoard tracker, writing RUN/tensorboard/, with two fixes: the nested config is flattened
    (its hparams refuse dicts and lists), and a resume's redone steps are cut from the event files, as metrics.jsonl
    drops them, so the curves read as one run in any reader."""

    def __init__(self, run_dir: Path):
        super().__init__(TENSORBOARD_DIR, run_dir)
        self.run_dir = run_dir

    @on_main_process
    def start(self) -> None:
        # started by init_trackers, after continue_metrics cut metrics.jsonl back to the resume point
        last = _last_logged_step(self.run_dir)
        folder = self.run_dir / TENSORBOARD_DIR
        if last is None and any(folder.rglob("events.out.tfevents.*")):  # as continue_metrics moves their rows
            aside = folder.with_name(f"{TENSORBOARD_DIR}.replaced-{int(time.time())}")
            folder.rename(aside)
            logger.warning("%s held events of an earlier attempt with no logged step to continue; moved to %s",
                           folder, aside.name)
        cut_events(folder, 0 if last is None else last + 1)
        self.init_kwargs.setdefault("purge_step", 0 if last is None else last + 1)
        super().start()

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        super().store_init_configuration(_flat(values))


def check_tensorboard(config: Config) -> None:
    """Refuse `report_to: tensorboard` without the package now, not after prepare and the model load."""
    import importlib.util

    if config.tracking.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError('tracking.report_to=tensorboard: the tensorboard package is not installed; '
                          'pip install "cogft[tensorboard]", or choose tracking.report_to=wandb or none')


_NO_LOGIN_NEEDED = ("offline", "dryrun", "disabled")


def wandb_mode(config: Config) -> str | None:
    """The W&B mode cogft sets: WANDB_MODE, else "disabled" for a true WANDB_DISABLED (as transformers reads it;
    wandb itself ignores it), else `tracking.wandb_mode`; None leaves it to wandb's settings files."""
    if mode := os.environ.get("WANDB_MODE"):
        return mode
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes", "on"):
        return "disabled"
    return config.tracking.wandb_mode


def check_wandb_login(config: Config) -> None:
    """Refuse `report_to: wandb` online with no W&B login now: wandb.init, which would fail on it, runs only after
    prepare and the model load. Finds the login the way wandb.init does (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE,
    the netrc entry `wandb login` writes for the configured host, the settings files), with no network and no
    prompt, and without starting wandb's session, which would freeze the environment before trackers_for sets it."""
    mode = wandb_mode(config)
    if config.tracking.report_to != "wandb" or mode in _NO_LOGIN_NEEDED:
        return
    try:  # wandb's own readers, internal API: where they differ in another wandb version, wandb.init decides later
        from wandb.sdk.lib import wbauth
        from wandb.sdk.wandb_settings import Settings

        settings = Settings()  # loaded as wandb_setup loads its own: the global, then the workspace file, then the env
        config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
        settings.settings_system = str(config_dir / "settings")
        settings.update_from_system_settings()
        settings.update_from_env_vars(dict(os.environ))
        if (mode or settings.mode) in _NO_LOGIN_NEEDED:  # `wandb offline` writes the mode to a settings file
            return
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        if settings.api_key or settings.identity_token_file or wbauth.read_netrc_auth(host=host):
            return
    except (ImportError, AttributeError, TypeError) as error:
        logger.debug("W&B login not checked before the run (%s: %s); wandb.init will", type(error).__name__, error)
        return
    why = f"W&B mode {mode}" if mode else "tracking.wandb_mode and WANDB_MODE unset"
    raise ConfigError(
        f"tracking.report_to=wandb: W&B would log online ({why}) but no W&B login was found (no WANDB_API_KEY, no "
        "key in the netrc file); run `wandb login` (or set WANDB_API_KEY), log offline with "
        "tracking.wandb_mode=offline (upload later with `wandb sync`), or turn W&B off with tracking.report_to=none"
    )


def trackers_for(config: Config, run_dir: Path) -> list:
    trackers: list = [JsonlTracker(config.tracking.run_name or run_dir.name, run_dir)]
    if config.tracking.report_to == "wandb":
        if mode := wandb_mode(config):  # WANDB_MODE itself where it is set
            os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        trackers.append("wandb")
    if config.tracking.report_to == "tensorboard":
        trackers.append(TensorBoardRun(run_dir))
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

    wandb = {"name": config.tracking.run_name or run_dir.name, "dir": str(run_dir),
             "id": wandb_run_id(run_dir) if accelerator.is_main_process else None}
    if wandb_mode(config) != "offline":  # offline, wandb ignores it with a warning; `wandb sync` joins runs by id
        wandb["resume"] = "allow"
    init_kwargs = {"wandb": wandb}
    values = {**config.model_dump(mode="json"), "dataset": dataset, "cogft_version": __version__,
              "cogft_commit": source_commit()}
    accelerator.init_trackers(config.tracking.project, config=values, init_kwargs=init_kwargs)


def wandb_run_id(run_dir: Path) -> str:
    """The id of the run directory's W&B run, made on its first start, so every resume continues that run."""
    import uuid

    path = run_dir / WANDB_ID_FILE
    if not path.is_file():  # written whole or not at all: a kill leaves no empty id behind
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(uuid.uuid4().hex[:12])
        os.replace(tmp, path)
    run_id = path.read_bytes().decode("utf-8", errors="replace").strip()
    if not _WANDB_ID.match(run_id):
        raise damaged(path, f"{run_id[:40]!r} is no W&B run id", "write the run's id back (the last part of its "
                            "wandb/run-DATE-ID folder name), or delete the file to log the rest of the run as a new "
                            "W&B run")
    return run_id


def log_videos(accelerator, videos: list[tuple[str, str]], step: int) -> None:
    """Send (prompt, mp4 path) pairs to W&B, when it is one of the trackers. TensorBoard gets none: its add_video
    wants the frames again and moviepy to encode a GIF; the mp4s are in samples/ and report.html."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({"validation/videos": [wandb.Video(path, caption=prompt, format="mp4")
                                               for prompt, path in videos]}, step=step)
        elif tracker.name == "tensorboard":
            logger.debug("validation videos of step %d not sent to TensorBoard (no video without moviepy); see "
                         "samples/ and report.html", step)
