"""What a run writes and reads back, what it leaves behind, what it records and publishes, and what it says:
damaged records named (not tracebacks), workers that die with their parent, files that follow the umask, a
TensorBoard log that reads as one run, a model card that holds hostile prompts, and messages that are right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

DAMAGED_JSON = {
    "truncated": b'{"step": 2, "eval_loss": 0.5, "checkpoi',
    "empty": b"",
    "not UTF-8": b'{"step": 2, "eval_loss": 0.5, "checkpoint": "checkpoints/step-000002\xff"}',
    "a list": b"[1, 2]",
    "wrong types": b'{"step": "2", "eval_loss": 0.5, "checkpoint": "checkpoints/step-000002"}',
    "a bool step": b'{"step": true, "eval_loss": 0.5, "checkpoint": "checkpoints/step-000002"}',
    "a NaN loss": b'{"step": 2, "eval_loss": NaN, "checkpoint": "checkpoints/step-000002"}',
    "an escaping path": b'{"step": 2, "eval_loss": 0.5, "checkpoint": "../../elsewhere"}',
    "nulls": b'{"step": null, "eval_loss": null, "checkpoint": null}',
}


@pytest.fixture
def run_with_checkpoints(make_config, tmp_path):
    """A run directory with its config and two complete (model-less) checkpoints, made in well under a second."""
    from accelerate import Accelerator

    from cogft.config_file import save_config
    from cogft.training.checkpointing import save_checkpoint

    config, run = make_config(), tmp_path / "run"
    run.mkdir()
    save_config(config, run / "config.yaml")
    accelerator = Accelerator(cpu=True)
    for step in (1, 2):
        save_checkpoint(accelerator, run, step, 5, config)
    return run


@pytest.mark.parametrize("how", sorted(DAMAGED_JSON))
def test_a_damaged_best_json_is_named_not_a_traceback(run_with_checkpoints, tmp_path, capsys, how):
    from cogft.cli import main
    from cogft.training.checkpointing import prune_checkpoints

    run = run_with_checkpoints
    (run / "best.json").write_bytes(DAMAGED_JSON[how])
    assert main(["export", "--from", str(run), "--out", str(tmp_path / "out"), "--best"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'best.json'} is damaged" in err and "--from" in err and "Traceback" not in err
    prune_checkpoints(run, 1)  # training's rotation: which checkpoint is best is unknown, so none goes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_other_damaged_records_are_named(run_with_checkpoints, tmp_path, caplog):
    from cogft.records import DamagedRecordError
    from cogft.run_dir import resolve_trained
    from cogft.tracking import continue_metrics, wandb_run_id
    from cogft.training.checkpointing import ResumeError, resolve_resume
    from cogft.training.metric_rows import logged_rows

    run = run_with_checkpoints
    (run / "export.json").write_bytes(b'{"step": "last"}')
    with pytest.raises(DamagedRecordError, match=r"export.json is damaged \('step' is 'last', not a whole number"):
        resolve_trained(run)
    (run / "export.json").unlink()
    marker = run / "checkpoints" / "step-000002" / "cogft_complete.json"
    marker.write_bytes(b'{"step": 2, "files": {"a": "b"')
    with pytest.raises(ResumeError, match=r"cogft_complete.json is damaged \(not JSON.*train.resume=.*step-000001"):
        resolve_resume("latest", run)
    marker.write_bytes(b'{"step": 2, "files": ["x"]}')
    with pytest.raises(ResumeError, match=r"cogft_complete.json is damaged \(its 'files'"):
        resolve_resume("latest", run)
    import torch
    from safetensors.torch import save_file

    (run / "lora").mkdir()
    save_file({"w": torch.zeros(1)}, run / "lora" / "pytorch_lora_weights.safetensors")
    (run / "config.yaml").write_bytes(b"model:\n  path: \xff\xfe\n")
    with pytest.raises(DamagedRecordError, match=r"config.yaml is damaged \(not UTF-8"):
        resolve_trained(run)
    (run / "wandb_run_id").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DamagedRecordError, match="wandb_run_id is damaged"):
        wandb_run_id(run)
    rows = [b'{"step": 1, "loss_smoothed": 1.0}', b'{"step": "2", "loss_smoothed": 1.0}', b"\xff\xfe garbage",
            b"[3]", b'{"step": 3, "loss_smoothed": "x"}', b'{"step": 4, "loss_smoothed": 0.5}']
    (run / "metrics.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    assert [row["step"] for row in logged_rows(run)] == [1, 3, 4]
    assert "3 damaged rows" in caplog.text
    continue_metrics(run, 3)  # the resume's cut: damaged rows go with the redone ones
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 3]

    from cogft.models.loading import pipeline_configs

    merged = tmp_path / "merged"  # a `cogft export --merge` cut short
    merged.mkdir()
    (merged / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline", ')
    with pytest.raises(DamagedRecordError, match=r"model_index.json is damaged \(not JSON.*export or build it again"):
        pipeline_configs(str(merged))


def test_decode_workers_die_with_a_killed_parent():
    """kill -9 of the process running `isolated_map` (as of `cogft prepare`) ends its workers mid-task."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = ("import time\nfrom cogft.data.workers import isolated_map\n"
              "list(isolated_map(time.sleep, [60] * 4, lambda item: None, workers=2))\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = [p for p in psutil.Process(parent.pid).children()
                       if any("spawn_main" in part for part in p.cmdline())]
        assert len(workers) == 2, "the workers did not start"
        time.sleep(0.5)  # well into their task
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]  # dead, not yet reaped by PID 1
        assert not alive, f"workers outlived their parent: {[p.pid for p in alive]}"
    finally:
        for process in workers:
            if process.is_running():
                process.kill()


def test_tensorboard_files_hold_each_step_once_after_a_kill_and_resume(tmp_path):
    """A killed run's event file holds steps 1-8, its metrics.jsonl (cut back to the checkpoint) steps 1-4 and a
    record cut short; the resumed tracker logs 5-6 again: every event file together holds each step once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from torch.utils.tensorboard import SummaryWriter

    from cogft.tracking import TensorBoardRun

    run = tmp_path / "run"
    killed = SummaryWriter(str(run / "tensorboard"))
    for step in range(1, 9):
        killed.add_scalar("loss", 1.0 / step, step)
    killed.close()
    event_file = next((run / "tensorboard").glob("events.out.tfevents.*"))
    event_file.write_bytes(event_file.read_bytes() + b"\x20\x00\x00\x00\x00")  # the kill cut a record short
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5)))
    resumed = TensorBoardRun(run)
    resumed.start()
    for step in (5, 6):
        resumed.log({"loss": 0.5}, step=step)
    resumed.finish()
    steps = [event.step for path in sorted((run / "tensorboard").rglob("events.out.tfevents.*"))
             for event in EventFileLoader(str(path)).Load()
             if event.HasField("summary") and any(v.tag == "loss" for v in event.summary.value)]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]

    (run / "metrics.jsonl").unlink()  # a fresh start: the earlier attempt's events go aside, as its rows do
    fresh = TensorBoardRun(run)
    fresh.start()
    fresh.finish()
    assert len(list(run.glob("tensorboard.replaced-*/events.out.tfevents.*"))) == 2  # the killed and resumed ones


def test_written_weights_follow_the_umask(make_config, tmp_path, capsys):
    """Checkpointed, exported (by the run and by `cogft export`) and built safetensors are 0644 under umask 022, as
    any file written with open() is, not the 0600 of the temporary files safetensors writes through."""
    import os
    import stat

    from cogft.cli import main
    from cogft.models.build import build_pipeline
    from cogft.models.registry import spec_named
    from cogft.training.loop import train

    old = os.umask(0o022)
    try:
        run = train(make_config("train.max_steps=2", "train.checkpoint_every=2", "validation.prompts=[]"))
        assert main(["export", "--from", str(run), "--out", str(tmp_path / "export")]) == 0
        built = build_pipeline(tmp_path / "built", spec_named("2b", "tiny://"))
    finally:
        os.umask(old)
    files = [*run.rglob("*.safetensors"), *(tmp_path / "export").rglob("*"), *built.rglob("*"), built]
    assert len([f for f in files if f.suffix == ".safetensors"]) >= 6
    modes = {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    wrong = {f: mode for f, mode in modes.items() if mode != (oct(0o755) if Path(f).is_dir() else oct(0o644))}
    assert not wrong


def test_the_held_out_set_is_chosen_by_the_clips_not_by_how_they_were_encoded():
    """A resume with data.image_noise_draws changed encodes every clip to new cache entries (their names hash the
    encoding); the held-out clips, picked by the clips' own bytes, stay the same, and so does the eval set."""
    from cogft.data.cache import CacheEntry
    from cogft.training.evaluation import split_holdout

    def entries(encoding: str) -> list[CacheEntry]:
        return [CacheEntry((f"/cache/latents/{encoding}-{n}.safetensors",), f"/cache/prompts/{n}.safetensors",
                           f"{n}.mp4", f"caption {n}", 9, 64, 96, clip=f"{n:064x}") for n in range(12)]

    before, after = (split_holdout(entries(encoding), 3, seed=0)[1] for encoding in ("draws4", "draws2"))
    assert [e.video for e in before] == [e.video for e in after] and len(before) == 3


def test_the_estimate_counts_a_batch_of_stills_with_more_tokens_than_the_clips():
    """At 480x720, 12 stills (data.image_batch_size) feed more tokens than one 49-frame clip: the estimate and the
    budget's choice count them; 2 stills feed fewer, and the clip's batch stands."""
    from cogft.bench.estimate import format_estimate
    from cogft.config_file import load_config
    from cogft.models.cost import estimate
    from cogft.models.loading import load_variant

    config = load_config(REPO / "configs" / "cogvideox-2b-lora.yaml", ["train.batch_size=1"])
    variant = load_variant(config.model.path, config.model.dtype)
    clips = estimate(config, variant)
    with_stills = load_config(REPO / "configs" / "cogvideox-2b-lora.yaml",
                              ["train.batch_size=1", "data.image_batch_size=12"])
    stills = estimate(with_stills, variant)
    assert stills.batch == (1, 12) and stills.peak_allocated_gib > clips.peak_allocated_gib
    assert "a batch of 12 still images" in format_estimate(with_stills, stills)
    few = load_config(REPO / "configs" / "cogvideox-2b-lora.yaml", ["train.batch_size=1", "data.image_batch_size=2"])
    assert estimate(few, variant) == clips


def test_data_wait_is_the_devices_idle_time_not_the_hosts_fetch():
    """On a GPU the host fetches the next batch while the previous step still runs: data_wait_s is the distance of
    the events around each fetch on the GPU's clock (0.005 s here), data_fetch_s the host's 0.23 s."""
    from cogft.training.metrics import Waited

    class Event:
        def __init__(self, ms: float) -> None:
            self.ms = ms

        def elapsed_time(self, end: Event) -> float:
            return end.ms - self.ms

        def synchronize(self) -> None:  # a recorded CUDA event: done once the step's scalars were read
            pass

    waited = Waited(host_s=0.23, events=[(Event(100.0), Event(103.0)), (Event(200.0), Event(202.0))])
    assert waited.device_s() == pytest.approx(0.005)
    assert Waited(host_s=0.23).device_s() == 0.23  # no GPU: the host's wait is the computation's


HOSTILE_PROMPT = 'a "quoted" <script>alert(1)</script> <img src=x onerror=alert(2)> ```\n# Heading [link](http://x) \\'


def test_the_model_card_holds_hostile_prompts_and_names_the_base_of_a_local_download(tmp_path):
    """Prompts and the caption prefix reach the card's body as text (no HTML, no markup, no broken fence), the load
    snippet is valid Python with the prompt's exact value, and a local folder of an official checkpoint names its
    Hub id as the base model."""
    import ast
    import re

    from cogft.config_file import build_config
    from cogft.inference.model_card import model_card
    from cogft.models.loading import load_for_config

    local = tmp_path / "CogVideoX-2b"  # a download of THUDM/CogVideoX-2b: its configs, as the Hub has them
    config, variant = load_for_config(build_config({"model": {"path": "THUDM/CogVideoX-2b"}, "data": {"path": "c"},
                                                    "output_dir": "run"}), validates=False)
    for part, (sub, name) in {"model_index": ("", "model_index.json"), "transformer": ("transformer", "config.json"),
                              "vae": ("vae", "config.json"),
                              "scheduler": ("scheduler", "scheduler_config.json")}.items():
        (local / sub).mkdir(parents=True, exist_ok=True)
        (local / sub / name).write_text(json.dumps(getattr(variant.spec.reference, part)))
    raw = {"model": {"path": str(local)}, "data": {"path": "c", "caption_prefix": "<b>sks</b> `x`"},
           "validation": {"prompts": [HOSTILE_PROMPT]}, "output_dir": "run"}
    config, variant = load_for_config(build_config(raw), validates=False)
    card = model_card(config, variant, 10, sample="sample.mp4")
    assert card.data.base_model == "THUDM/CogVideoX-2b" and str(local) not in card.text
    body = card.text  # the card without its front matter
    snippet = re.search(r"^(`{3,})python\n(.*?)^\1$", body, re.S | re.M)
    tree = ast.parse(snippet.group(2))  # valid Python
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg == "prompt")
    assert ast.literal_eval(call.value) == "<b>sks</b> `x` " + HOSTILE_PROMPT
    prose = body.replace(snippet.group(0), "")
    assert "<script" not in prose and "<img" not in prose and "<b>" not in prose and "\n# Heading" not in prose
    assert "[link](" not in prose


def test_messages_say_the_right_thing(tmp_path, capsys):
    """--image and validation.images name a missing file or a folder as what it is, with advice that applies; the
    bare hf://datasets/OWNER/NAME keeps its //; data.buckets=auto sizes are named as auto's, not as entries."""
    from cogft.cli import main
    from cogft.config import ConfigError
    from cogft.config_file import build_config
    from cogft.data.images import conditioning_image
    from cogft.models.loading import load_for_config

    with pytest.raises(ConfigError) as missing:
        conditioning_image(tmp_path / "nope.png", 64, 96, "crop", "--image")
    assert "not found" in str(missing.value) and "leave it out" not in str(missing.value)
    with pytest.raises(ConfigError, match="is a folder, not an image file") as folder:
        conditioning_image(tmp_path, 64, 96, "crop", "--image")
    assert "leave it out" not in str(folder.value)

    raw = {"model": {"path": "THUDM/CogVideoX-5b-I2V"}, "data": {"path": "c", "buckets": "auto"}, "output_dir": "r"}
    with pytest.raises(ConfigError) as auto:
        load_for_config(build_config(raw), validates=False)
    said = str(auto.value)
    del raw["data"]["buckets"]
    config, variant = load_for_config(build_config(raw), validates=False)
    assert said.startswith("data.buckets=auto derives ") and "data.buckets[" not in said
    assert "leave data.buckets out" in said
    with pytest.raises(ConfigError, match=f"validation.images: {tmp_path} is a folder, not an image file"):
        variant.check_validation_conditions(["a prompt"], [str(tmp_path)], [])

    assert main(["doctor", "hf://datasets/someone/no-such-clips"]) == 2
    err = capsys.readouterr().err
    assert "hf://datasets/someone/no-such-clips" in err and "hf:/datasets" not in err.replace("hf://", "")


def test_doctor_reads_a_bare_hub_dataset_from_the_cache(tmp_path, monkeypatch, capsys):
    """`cogft doctor hf://datasets/OWNER/NAME`, the form data.path takes, checks the cached snapshot."""
    from huggingface_hub import constants

    from cogft.cli import main

    snapshot = tmp_path / "hub" / "datasets--me--clips" / "snapshots" / ("0" * 40)
    (snapshot / "clips").mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    clip = next((REPO / "data" / "videos").glob("*.mp4"))
    (snapshot / "clips" / "a.mp4").write_bytes(clip.read_bytes())
    (snapshot / "metadata.csv").write_text("file_name,caption\nclips/a.mp4,a clip\n")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["doctor", "hf://datasets/me/clips", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == "hf://datasets/me/clips" and len(report["files"]) == 1


def test_a_checkpoint_whose_states_do_not_load_is_named(make_config, tmp_path):
    """Bytes changed in place (the sizes the marker recorded still hold): the resume names the checkpoint and the
    intact one before it, not a traceback from torch.load."""
    from accelerate import Accelerator

    from cogft.training.checkpointing import ResumeError, TrainingProgress, load_checkpoint, save_checkpoint

    run, accelerator = tmp_path / "run", Accelerator(cpu=True)
    accelerator.register_for_checkpointing(TrainingProgress())
    for step in (1, 2):
        save_checkpoint(accelerator, run, step, 5, make_config())
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):  # the second, accelerate would skip silently
        states = run / "checkpoints" / "step-000002" / name
        kept = states.read_bytes()
        states.write_bytes(b"\x00" * len(kept))
        with pytest.raises(ResumeError, match=r"step-000002 is damaged: its states do not load .*takes step-000001"):
            load_checkpoint(accelerator, run / "checkpoints" / "step-000002")
        states.write_bytes(kept)


def test_missing_and_misplaced_paths_are_called_what_they_are(tmp_path, make_config):
    """--from, train.resume and --config name a missing path as missing and a file or folder as what it is."""
    from cogft.config import ConfigError
    from cogft.config_file import load_config
    from cogft.run_dir import resolve_trained
    from cogft.training.checkpointing import ResumeError, resolve_resume

    afile = tmp_path / "a.txt"
    afile.write_text("x")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_trained(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="a file, not a folder"):
        resolve_trained(afile)
    with pytest.raises(ResumeError, match="no such folder"):
        resolve_resume(str(tmp_path / "nothing"), tmp_path)
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)


def test_an_sft_exports_damaged_config_is_named(make_config, tmp_path):
    """RUN/transformer/config.json cut short: `--from RUN` names it (and takes no damaged weights)."""
    from cogft.config import ConfigError
    from cogft.config_file import save_config
    from cogft.run_dir import resolve_trained

    run = tmp_path / "run"
    (run / "transformer").mkdir(parents=True)
    save_config(make_config("train.mode=sft"), run / "config.yaml")
    (run / "transformer" / "config.json").write_text('{"_class_name": "CogVideoXTransformer3DModel", "num_')
    with pytest.raises(ConfigError, match=r"transformer/config.json is damaged \(not JSON"):
        resolve_trained(run)
