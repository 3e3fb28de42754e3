"""A full disk: a named error with the folder, the free space, the need and the fix; nothing on disk lost, no debris.

The disk fills on cue: a writer is patched to fail as the real one does on a full disk. The messages are what each
writer raised on a 64 KiB tmpfs filled up (torch 2.13, safetensors 0.8).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cogft.config import ConfigError
from cogft.disk import DiskFullError, is_disk_full
from cogft.run_dir import checkpoint_damage, complete_checkpoints
from cogft.training.loop import train

REPO = Path(__file__).resolve().parent.parent
FAST = ["validation.prompts=[]", "tracking.report_to=none"]
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def debris(folder: Path) -> list[Path]:
    """What a failed write may leave: temporary files, partial checkpoints or exports, a moved-aside export."""
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial", ".old"))]


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    SafetensorError(SAFETENSORS_FULL),
    RuntimeError(TORCH_FULL),
    RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),  # earlier torch versions
])
def test_each_writers_full_disk_is_recognised(error):
    assert is_disk_full(error)


@pytest.mark.parametrize("error", [
    OSError(errno.EACCES, "Permission denied"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at inline_container.cc:120] . unexpected position for record data/7"),
    SafetensorError("Error while deserializing header: HeaderTooLarge"),
    ValueError("No space left on device"),  # not a writer's error
])
def test_unrelated_errors_are_not_taken_for_a_full_disk(error):
    assert not is_disk_full(error)


def fill_the_disk_at_checkpoints(monkeypatch) -> None:
    """torch.save (the optimizer, RNG and progress files) fails inside a partial checkpoint as on a full disk,
    leaving half a file as torch's zip writer does; `monkeypatch.undo()` frees the disk."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".partial" not in str(f):
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_at_a_checkpoint_stops_with_the_fix_and_loses_nothing(make_config, monkeypatch):
    config = make_config(*FAST, "train.max_steps=2", "train.checkpoint_every=2", out="run")
    run = Path(config.output_dir)
    fill_the_disk_at_checkpoints(monkeypatch)
    with pytest.raises(DiskFullError) as first:  # the first checkpoint: nothing earlier to keep
        train(config)
    said = str(first.value)
    assert said.startswith(f"no space left on device writing checkpoint {run / 'checkpoints' / 'step-000002'}: ")
    assert f"free in {run / 'checkpoints'}, about " in said and "about 0 B needed" not in said
    assert "there was no earlier checkpoint" in said and "set output_dir" in said and "train.resume=latest" in said
    assert isinstance(first.value, ConfigError) and first.value.errno == errno.ENOSPC  # the CLI's user error
    assert complete_checkpoints(run) == [] and debris(run) == []

    monkeypatch.undo()
    train(config)
    fill_the_disk_at_checkpoints(monkeypatch)
    with pytest.raises(DiskFullError, match=r"the previous checkpoint is intact \(step-000002\).*"
                                            r"then rerun with train.resume=latest"):
        train(make_config(*FAST, "train.max_steps=4", "train.checkpoint_every=2", out="run"))
    (previous,) = complete_checkpoints(run)
    assert previous.name == "step-000002" and checkpoint_damage(previous) is None and debris(run) == []
    failed = {row["step"]: row["loss"] for row in logged(run)}

    monkeypatch.undo()
    resumed = train(make_config(*FAST, "train.max_steps=4", "train.checkpoint_every=2", out="run"))
    rows = logged(resumed)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["loss"] for row in rows[2:]] == [failed[3], failed[4]]  # the state in memory was left as it was


def test_a_full_disk_at_the_final_export_keeps_the_previous_export(make_config, monkeypatch):
    import safetensors.torch

    run = train(make_config(*FAST, "train.max_steps=2", "train.checkpoint_every=2", out="run"))
    before = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if ".export.partial" not in str(filename):  # checkpoints write as usual
            return real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"half a file")  # a writer that leaves what it wrote
        raise SafetensorError(SAFETENSORS_FULL)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(DiskFullError) as failed:
        train(make_config(*FAST, "train.max_steps=4", "train.checkpoint_every=2", out="run"))
    said = str(failed.value)
    assert said.startswith(f"no space left on device writing the final export {run / 'lora'}: ")
    assert f"free in {run}, about " in said and "the previous lora/ is intact" in said
    assert f"`cogft export --from {run / 'checkpoints' / 'step-000004'} --out DIR`" in said
    after = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert json.loads((run / "export.json").read_text())["step"] == 2 and debris(run) == []

    monkeypatch.undo()  # space freed: the same command resumes at the last step and exports
    train(make_config(*FAST, "train.max_steps=4", "train.checkpoint_every=2", out="run"))
    assert json.loads((run / "export.json").read_text())["step"] == 4
    exported = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    checkpointed = load_file(run / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(exported[k], checkpointed[k].half()) for k in checkpointed)  # released in fp16 (2B)


def test_a_full_disk_in_prepare_is_a_user_error_that_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    from cogft.cli import main

    cache = tmp_path / "cache"

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # the disk filled as the entry was flushed

    monkeypatch.setattr(os, "fsync", fsync)
    code = main(["prepare", "--config", str(REPO / "configs" / "tiny-lora.yaml"), f"data.path={REPO / 'data'}",
                 f"data.cache_dir={cache}", f"output_dir={tmp_path / 'run'}", "tracking.report_to=none"])
    said = capsys.readouterr().err
    assert code == 2 and "Traceback" not in said
    assert f"cogft prepare: error: no space left on device writing cache entry {cache / 'latents'}" in said
    assert "free in" in said and "set data.cache_dir to a folder on a disk with room" in said
    assert list(cache.rglob("*.tmp")) == []


def test_the_next_prepare_removes_temporary_files_of_dead_writers_only(make_config, tmp_path):
    from cogft.data.cache import prepare
    from cogft.models.loading import load_variant

    writer = subprocess.Popen([sys.executable, "-c", ""])  # a prepare killed mid-write: its pid is gone
    writer.wait()
    folder = tmp_path / "cache" / "latents" / "ab"
    folder.mkdir(parents=True)
    dead, live, recent = (folder / f".{name}.safetensors.{pid}.tmp"
                          for name, pid in (("a", writer.pid), ("b", os.getpid()), ("c", writer.pid)))
    long_ago = time.time() - 24 * 3600  # stale by any measure
    for tmp in (dead, live, recent):
        tmp.write_bytes(b"half an entry")
    for tmp in (dead, live):
        os.utime(tmp, (long_ago, long_ago))
    data = tmp_path / "clips"
    data.mkdir()
    shutil.copy(REPO / "data" / "videos" / "bouncing_square.mp4", data / "one.mp4")
    (data / "videos.txt").write_text("one.mp4\n")
    (data / "prompts.txt").write_text("a red square\n")
    config = make_config(f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}")
    prepare(config, load_variant(config.model.path), torch.device("cpu"), show_progress=False)
    assert not dead.exists()
    assert live.exists()  # its writer may still rename it into place
    assert recent.exists()  # too recent to judge: a writer on another machine has a pid this one cannot check
