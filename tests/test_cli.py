"""The commands as a user types them: train.py under accelerate launch, errors, sample and export."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*args, env=None, timeout=180):
    return subprocess.run([*args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_bad_key_fails_fast_with_named_error(tmp_path):
    started = time.perf_counter()
    result = run(sys.executable, "train.py", "--config", "configs/tiny-lora.yaml", "train.max_step=3")
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    assert "train.max_step: unknown key" in result.stderr and "max_steps" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 10  # no model or torch import before the config is checked (generous for slow CI)
    probe = run(sys.executable, "-c", "import sys; from cogft.cli import main; "
                "code = main(['train', '--config', 'configs/tiny-lora.yaml', 'train.max_step=3']); "
                "print(code, 'torch' in sys.modules)")
    assert probe.stdout.split() == ["2", "False"]  # failed before torch was imported: well under a second


def test_accelerate_launch_trains_with_wandb_offline(tmp_path, shared_cache):
    out = tmp_path / "run"
    result = run(
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/single_gpu.yaml",
        "train.py", "--config", "configs/tiny-lora.yaml",
        f"output_dir={out}", f"data.cache_dir={shared_cache}", "train.max_steps=4", "validation.every=2",
        "validation.num_inference_steps=2", "train.checkpoint_every=2",
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size=1" in result.stderr
    rows = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "loss_scale", "step_time"} <= rows[0].keys()
    wandb_runs = list((out / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    records = next(wandb_runs[0].glob("run-*.wandb")).read_bytes()  # no Python reader: the config is JSON inside
    assert b'"buckets":{"9x64x96":6}' in records and b'"clips":6' in records
    assert len(list(wandb_runs[0].glob("files/media/videos/**/*.mp4"))) == 4  # 2 prompts x (step 2, step 4)

    sample = run(sys.executable, "-m", "cogft.cli", "sample", "--from", str(out), "--prompt", "a red square",
                 "--out", str(tmp_path / "x.mp4"), "--steps", "2")
    assert sample.returncode == 0, sample.stderr[-2000:]

    resumed = run(sys.executable, "train.py", "--config", "configs/tiny-lora.yaml", f"output_dir={out}",
                  f"data.cache_dir={shared_cache}", "train.max_steps=5", "validation.prompts=[]",
                  env={"WANDB_MODE": "offline"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # nothing a user cannot act on: accelerate imports deepspeed wherever it is installed, and without a GPU
    # deepspeed said it fell back to the CPU (the run's first line says device=cpu already); pydantic 2.6 warned
    # about the config's serialisation on its way to W&B
    printed = resumed.stdout + resumed.stderr
    for noise in ("Setting accelerator to CPU", "Setting ds_accelerator to cpu", "Pydantic serializer warnings"):
        assert noise not in printed
    run_id = (out / "wandb_run_id").read_text().strip()
    wandb_runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in wandb_runs)  # one W&B run, continued
    assert (tmp_path / "x.mp4").stat().st_size > 1000

    missing = run(sys.executable, "-m", "cogft.cli", "export", "--from", str(tmp_path / "nothing"),
                  "--out", str(tmp_path / "e"))
    assert missing.returncode == 2 and "nothing: no such folder; give a run directory" in missing.stderr


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((REPO / "accelerate_configs").glob("*.yaml"))
    assert {f.stem for f in files} >= {"single_gpu", "ddp", "multi_node"}
    for file in files:
        config = load_config_from_file(str(file))
        assert config.mixed_precision == "no", file  # cogft applies the precision policy itself


def test_sample_and_export_mistakes_are_named_errors(make_config, tmp_path, capsys):
    from cogft.cli import main
    from cogft.training.loop import train

    run_dir = train(make_config("validation.prompts=[]", "train.max_steps=1"))
    common = ["sample", "--from", str(run_dir), "--prompt", "a cat", "--out", str(tmp_path / "x.mp4")]
    for extra, said in ((["--steps", "0"], "must be at least 1"), (["--steps", "-3"], "must be at least 1"),
                        (["--device", "cuda"], "--device cuda: no CUDA GPU is visible here")):
        try:
            code = main([*common, *extra])
        except SystemExit as exit_:  # argparse's own exit for a bad option value
            code = exit_.code
        assert code == 2 and said in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["export", "--from", str(run_dir), "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_datasets_that_cannot_train_are_named_before_the_model_loads(make_config, tmp_path, capsys):
    from cogft.cli import main

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "clip.mp4").write_text("not a video")
    (broken / "clip.txt").write_text("a caption")
    args = ["train", "--config", "configs/tiny-lora.yaml", "tracking.report_to=none", "validation.prompts=[]",
            f"data.cache_dir={tmp_path / 'cache'}"]
    assert main([*args, f"data.path={broken}", f"output_dir={tmp_path / 'a'}"]) == 2
    assert "the dataset is empty: every clip was skipped" in capsys.readouterr().err
    (tmp_path / "meta.csv").write_text("video,text\nvideos/fractal_zoom.mp4,a zoom\n")
    assert main([*args, f"data.path={tmp_path / 'meta.csv'}", f"output_dir={tmp_path / 'b'}"]) == 2
    assert "no row has a 'caption' column (columns: video, text); set data.caption_column" in capsys.readouterr().err


def test_version_and_the_notebook_api(capsys):
    import pytest

    import cogft
    from cogft import load_config, sample, train
    from cogft.cli import main
    from cogft.inference.sampling import sample as sample_itself
    from cogft.training.loop import train as train_itself

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"cogft {cogft.__version__}"
    assert cogft.__version__ != "0+unknown"  # read from the installed package's metadata
    assert train is train_itself and sample is sample_itself and callable(load_config)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cogft.nope  # noqa: B018 (the attribute access is what is tested)
    light = subprocess.run([sys.executable, "-c", "import sys, cogft; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"  # the API loads on first use


def test_overrides_may_sit_on_either_side_of_the_flags(capsys):
    """`--gpu-memory 4 train.max_steps=3` after other overrides: each override is read, a stray word is refused."""
    from cogft.cli import parse

    args = parse(["estimate", "--config", "configs/tiny-lora.yaml", "train.max_steps=3", "--json", "lora.rank=4"])
    assert args.overrides == ["train.max_steps=3", "lora.rank=4"] and args.json
    with pytest.raises(SystemExit):
        parse(["estimate", "--config", "configs/tiny-lora.yaml", "train.max_steps=3", "--json", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err
