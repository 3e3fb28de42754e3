"""End-to-end runs on the tiny model: LoRA and SFT, export, sampling, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogft.training.loop import train

REPO = Path(__file__).resolve().parent.parent
FAST = ["validation.prompts=[]", "train.checkpoint_every=100"]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def frames_of(path: Path):
    import decord

    return decord.VideoReader(str(path))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, shared_cache):
    """8 LoRA steps with alpha != rank, checkpoints every 4, validation every 4 (2 denoising steps)."""
    from cogft.config_file import load_config

    out = tmp_path_factory.mktemp("lora") / "run"
    config = load_config(REPO / "configs" / "tiny-lora.yaml", [
        f"data.path={REPO / 'data'}", f"data.cache_dir={shared_cache}", f"output_dir={out}",
        "tracking.report_to=none", "train.max_steps=8", "train.checkpoint_every=4", "validation.every=4",
        "validation.num_inference_steps=2", "lora.rank=4", "lora.alpha=8", "train.learning_rate=1e-2",
    ])
    return train(config)


def test_lora_run_layout(lora_run):
    assert (lora_run / "config.yaml").is_file()
    assert [p.name for p in sorted((lora_run / "checkpoints").iterdir())] == ["step-000004", "step-000008"]
    values = losses(lora_run)
    assert len(values) == 8 and all(torch.isfinite(torch.tensor(values)))
    videos = sorted((lora_run / "samples").glob("*.mp4"))
    assert [v.name[:11] for v in videos] == ["step-000004"] * 2 + ["step-000008"] * 2
    reader = frames_of(videos[0])
    assert len(reader) == 9 and reader[0].shape == (64, 96, 3)
    report = [json.loads(line) for line in (lora_run / "prepare_report.jsonl").read_text().splitlines()]
    assert len(report) == 7 and all(r["status"] in ("encoded", "cached") for r in report[:-1])
    assert report[-1]["summary"]["kept"] == 6 and report[-1]["summary"]["buckets"] == {"9": 6}


STOCK_LOAD = r"""
import sys, torch
from diffusers import CogVideoXPipeline
pipe = CogVideoXPipeline.from_pretrained(sys.argv[1])
kw = dict(prompt="a red square", num_frames=9, height=64, width=96, num_inference_steps=2,
          max_sequence_length=16, output_type="pt")
base = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
pipe.load_lora_weights(sys.argv[2])
layer = pipe.transformer.transformer_blocks[0].attn1.to_q
adapter = next(iter(layer.scaling))
tuned = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
assert "cogft" not in sys.modules
print(layer.scaling[adapter], (tuned - base).abs().max().item())
"""


def test_lora_loads_into_stock_pipeline_and_changes_output(lora_run, cogft_home):
    from cogft.models.loading import resolve_model_path

    result = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, resolve_model_path("tiny://2b"), str(lora_run / "lora")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, cwd="/",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    scaling, change = map(float, result.stdout.split()[-2:])
    assert scaling == pytest.approx(8 / 4)  # lora_alpha / rank survived the export
    assert change > 1e-4


def test_sample_from_run_and_checkpoint(lora_run, tmp_path):
    from cogft.inference.sampling import sample

    a = sample(str(lora_run), "a red square", str(tmp_path / "final.mp4"), steps=2)
    b = sample(str(lora_run / "checkpoints" / "step-000004"), "a red square", str(tmp_path / "ckpt.mp4"), steps=2)
    fa, fb = frames_of(a), frames_of(b)
    assert len(fa) == len(fb) == 9
    assert fa[0].shape == (64, 96, 3)
    assert not torch.equal(torch.from_numpy(fa.get_batch(range(9)).asnumpy()),
                           torch.from_numpy(fb.get_batch(range(9)).asnumpy()))


def test_sample_of_a_run_trained_with_fa4_falls_back_to_sdpa_here(lora_run, tmp_path, caplog):
    import yaml

    from cogft.inference.sampling import sample

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy, ignore=shutil.ignore_patterns("checkpoints", "samples", "wandb"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["attention"] = "fa4"  # as written by a run on an H100 with flash-attn-4
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    a = sample(str(lora_run), "a red square", str(tmp_path / "here.mp4"), steps=2)
    b = sample(str(copy), "a red square", str(tmp_path / "fa4-run.mp4"), steps=2)
    assert "model.attention=fa4 cannot run here" in caplog.text
    fa, fb = frames_of(a), frames_of(b)
    assert torch.equal(torch.from_numpy(fa.get_batch(range(len(fa))).asnumpy()),
                       torch.from_numpy(fb.get_batch(range(len(fb))).asnumpy()))


def test_export_merge_samples_like_base_plus_lora(lora_run, tmp_path):
    from diffusers import CogVideoXPipeline

    from cogft.inference.export import export
    from cogft.models.loading import resolve_model_path

    copied = export(str(lora_run), str(tmp_path / "plain"))
    assert (copied / "pytorch_lora_weights.safetensors").is_file()
    merged_dir = export(str(lora_run), str(tmp_path / "merged"), merge=True)
    kw = dict(prompt="a red square", num_frames=9, height=64, width=96, num_inference_steps=2,
              max_sequence_length=16, output_type="pt")
    merged = CogVideoXPipeline.from_pretrained(merged_dir, dtype=torch.float32)
    assert not merged.transformer.peft_config if hasattr(merged.transformer, "peft_config") else True
    with_lora = CogVideoXPipeline.from_pretrained(resolve_model_path("tiny://2b"), dtype=torch.float32)
    base = with_lora(generator=torch.Generator().manual_seed(0), **kw).frames
    with_lora.load_lora_weights(str(lora_run / "lora"))
    expected = with_lora(generator=torch.Generator().manual_seed(0), **kw).frames
    got = merged(generator=torch.Generator().manual_seed(0), **kw).frames
    assert (got - expected).abs().max() < 0.2 * (expected - base).abs().max()


def test_sft_run_exports_a_loadable_transformer(make_config, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    from cogft.inference.sampling import sample
    from cogft.models.loading import resolve_model_path

    run = train(make_config("train.max_steps=3", "validation.num_inference_steps=2", base="tiny-sft.yaml"))
    tuned = CogVideoXTransformer3DModel.from_pretrained(run / "transformer")
    base = CogVideoXTransformer3DModel.from_pretrained(resolve_model_path("tiny://2b"), subfolder="transformer")
    exported = load_file(run / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.float16}
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) > 10
    checkpoint = run / "checkpoints" / "step-000003" / "transformer"
    assert next(CogVideoXTransformer3DModel.from_pretrained(checkpoint).parameters()).dtype == torch.float32
    assert len(frames_of(sample(str(run), "a cat", str(tmp_path / "s.mp4"), steps=2))) == 9


def test_loss_goes_down_on_a_fixed_batch(make_config):
    from cogft.data.cache import prepare
    from cogft.data.dataset import LatentDataset, collate
    from cogft.models.adapters import setup_trainable
    from cogft.models.cogvideox.objective import diffusion_loss, draw_inputs
    from cogft.models.loading import load_scheduler, load_transformer, load_variant

    config = make_config("model.dtype=fp32", "lora.rank=8", "lora.alpha=8")
    variant = load_variant(config.model.path, "fp32")
    entries = prepare(config, variant, torch.device("cpu"), show_progress=False).entries
    batch = collate([LatentDataset(entries)[i] for i in range(2)])
    transformer = load_transformer(config.model.path, variant)
    params = setup_trainable(transformer, config)
    scheduler = load_scheduler(config.model.path, variant)
    inputs = draw_inputs(batch["latent_mean"], batch["latent_logvar"], variant.scaling_factor, 1000,
                         [torch.Generator().manual_seed(i) for i in range(2)])
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    predict = lambda x_t, t: transformer(hidden_states=x_t, encoder_hidden_states=batch["prompt_embeds"], timestep=t,
                                         return_dict=False)[0]
    history = []
    for _ in range(30):
        loss = diffusion_loss(predict, scheduler, inputs.x0, inputs.noise, inputs.timesteps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(loss.item())
    assert history[-1] < 0.85 * history[0], history


@pytest.mark.parametrize("family,accum,windows", [("2b", 1, 1), ("5b", 2, 2), ("1.5-5b", 1, 1), ("1.5-5b-i2v", 1, 2)])
def test_resume_is_bit_exact(make_config, family, accum, windows):
    """5 steps straight == 2 steps, stop, resume to 5 (mid-epoch skip and an epoch boundary included); for
    image-to-video with the image's noisy-encoding draw and a high image dropout on; caption dropout on for all."""
    common = [f"model.path=tiny://{family}", f"train.gradient_accumulation_steps={accum}", f"data.windows={windows}",
              "data.image_dropout=0.5", "data.caption_dropout=0.3", *FAST]
    straight = train(make_config(*common, "train.max_steps=5", out="straight"))
    first_leg = train(make_config(*common, "train.max_steps=2", out="resumed"))
    assert (first_leg / "checkpoints" / "step-000002").is_dir()
    resumed = train(make_config(*common, "train.max_steps=5", out="resumed"))
    assert len(losses(resumed)) == 5
    assert losses(straight) == losses(resumed)
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_partial_gradient_checkpointing_keeps_the_numbers(make_config):
    plain = train(make_config(*FAST, "train.max_steps=3", out="plain"))
    half = train(make_config(*FAST, "train.max_steps=3", "train.gradient_checkpointing=0.5", out="half"))
    torch.testing.assert_close(torch.tensor(losses(plain)), torch.tensor(losses(half)), rtol=1e-5, atol=1e-6)
    a = load_file(plain / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(half / "lora" / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_offloaded_checkpointing_keeps_the_numbers(make_config):
    """The offloading checkpoint (host-stashed inputs, recompute in backward) matches no checkpointing, SFT too."""
    for mode, base in (("lora", "tiny-lora.yaml"), ("sft", "tiny-sft.yaml")):
        plain = train(make_config(*FAST, "train.max_steps=2", base=base, out=f"{mode}-plain"))
        offloaded = train(make_config(*FAST, "train.max_steps=2", "train.gradient_checkpointing=true",
                                      "train.offload_checkpoints=true", base=base, out=f"{mode}-offloaded"))
        torch.testing.assert_close(torch.tensor(losses(plain)), torch.tensor(losses(offloaded)), rtol=1e-5, atol=1e-6)
        name = ("lora/pytorch_lora_weights.safetensors" if mode == "lora"
                else "transformer/diffusion_pytorch_model.safetensors")
        a, b = load_file(plain / name), load_file(offloaded / name)
        for key in a:
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-5)


def test_validation_out_of_memory_is_skipped_not_fatal(make_config, monkeypatch):
    import cogft.training.validation

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(cogft.training.validation, "render", out_of_memory)
    run = train(make_config("train.max_steps=2", "validation.every=1", out="oom"))
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not list(run.glob("samples/*.mp4"))  # every validation video was skipped, training went on


@pytest.mark.parametrize("autotune", [False, True])
def test_compile_autotune_reaches_every_compiled_block(make_config, monkeypatch, autotune):
    """`train.compile_autotune` compiles each block with inductor's coordinate-descent tuning (a GPU-only pass)."""
    from cogft.bench.training import cogft_step
    from cogft.models.loading import load_variant

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(kwargs.get("options")) or fn)
    config = make_config("train.compile=true", f"train.compile_autotune={str(autotune).lower()}",
                         "train.gradient_checkpointing=0.5")
    variant = load_variant(config.model.path, config.model.dtype)
    cogft_step(config, variant, torch.device("cpu"))
    expected = {"coordinate_descent_tuning": True} if autotune else None
    assert compiled == [expected] * variant.configs.transformer["num_layers"]


SAME_OUTPUT = r"""
import sys, torch
from diffusers import CogVideoXPipeline
pipe = CogVideoXPipeline.from_pretrained(sys.argv[1])
kw = dict(prompt="a red square", num_frames=9, height=64, width=96, num_inference_steps=2, max_sequence_length=16,
          output_type="latent")
outputs = []
for lora in sys.argv[2:]:
    pipe.load_lora_weights(lora, adapter_name=f"a{len(outputs)}")
    pipe.set_adapters([f"a{len(outputs)}"])
    outputs.append(pipe(generator=torch.Generator().manual_seed(0), **kw).frames)
print((outputs[0] - outputs[1]).abs().max().item(), outputs[0].abs().max().item())
"""


def test_the_exported_lora_is_released_in_the_models_dtype_with_its_metadata(lora_run, tmp_path):
    """lora/ holds fp16 weights for 2B (half the file) with metadata naming the base model, cogft's version, rank,
    alpha and targets; the checkpoint of the same step keeps fp32 (exact resume); a stock pipeline gives the same
    output from both, fp16 rounding aside; `cogft export` releases the same way, and lora.export_dtype=fp32 keeps
    fp32."""
    import json

    from safetensors import safe_open

    from cogft import __version__
    from cogft.inference.export import export
    from cogft.models.loading import resolve_model_path

    def read(path):
        with safe_open(str(path), "pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118 (a safe_open handle has keys() but no __iter__)

    released, meta = read(lora_run / "lora" / "pytorch_lora_weights.safetensors")
    kept, _ = read(lora_run / "checkpoints" / "step-000008" / "pytorch_lora_weights.safetensors")
    assert {t.dtype for t in released.values()} == {torch.float16}
    assert {t.dtype for t in kept.values()} == {torch.float32}
    assert all(torch.equal(released[k], kept[k].half()) for k in kept)
    assert (meta["base_model"], meta["cogft_version"], meta["lora_rank"], meta["lora_alpha"], meta["dtype"]) == (
        "tiny://2b", __version__, "4", "8.0", "float16")
    assert json.loads(meta["lora_target_modules"]) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert "lora_adapter_metadata" in meta  # diffusers' own, which carries alpha to a stock pipeline

    result = subprocess.run(
        [sys.executable, "-c", SAME_OUTPUT, resolve_model_path("tiny://2b"), str(lora_run / "lora"),
         str(lora_run / "checkpoints" / "step-000008")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, cwd="/",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    difference, scale = map(float, result.stdout.split()[-2:])
    assert difference <= 2e-3 * scale, (difference, scale)

    copied, copied_meta = read(export(str(lora_run / "checkpoints" / "step-000004"), str(tmp_path / "out"))
                               / "pytorch_lora_weights.safetensors")
    assert {t.dtype for t in copied.values()} == {torch.float16} and copied_meta["base_model"] == "tiny://2b"


def test_lora_export_dtype_fp32_keeps_the_master_weights(make_config):
    from safetensors import safe_open

    run = train(make_config(*FAST, "train.max_steps=2", "lora.export_dtype=fp32"))
    with safe_open(str(run / "lora" / "pytorch_lora_weights.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float32}  # noqa: SIM118 (a safe_open handle has keys() but no __iter__)
        assert handle.metadata()["dtype"] == "float32"


def test_a_run_ends_with_a_summary_of_what_it_made_and_the_next_command(make_config, caplog):
    import logging

    from cogft.training.summary import run_summary

    with caplog.at_level(logging.INFO, logger="cogft.training.loop"):
        run = train(make_config(*FAST, "train.max_steps=4", "train.checkpoint_every=2"))
    said = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("finished: tiny://2b, lora"))
    best = min(json.loads(line)["loss_smoothed"] for line in (run / "metrics.jsonl").read_text().splitlines())
    assert f"step 4 of 4, in {run}" in said and f"best {best:.4f}" in said
    assert f"weights: {run / 'lora'} (step 4)" in said
    assert f"checkpoints: step-000002, step-000004 in {run / 'checkpoints'}" in said
    assert f'next: cogft sample --from {run} --prompt "..." --out sample.mp4' in said
    stopped = run_summary(make_config(*FAST, "train.max_steps=4"), run, stopped=True)
    assert stopped.startswith("stopped:") and "train.resume=latest continues" in stopped and "weights:" not in stopped


def test_exports_carry_a_model_card_the_hub_reads(make_config, tmp_path):
    """lora/README.md (and cogft export's) parses as a Hub model card: library, tags, the trigger word, the
    training settings and the first validation prompt's video beside it; a hub base model gets its id and its
    license in the front matter (2B Apache-2.0, the 5B family the CogVideoX license)."""
    from huggingface_hub import ModelCard

    from cogft.config_file import build_config
    from cogft.inference.export import export
    from cogft.inference.model_card import model_card
    from cogft.models.loading import load_for_config

    run = train(make_config("train.max_steps=2", "validation.every=2", "validation.num_inference_steps=2",
                            "data.caption_prefix=sks"))
    card = ModelCard.load(run / "lora" / "README.md")
    assert card.data.library_name == "diffusers" and {"lora", "text-to-video", "cogvideox-2b"} <= set(card.data.tags)
    assert card.data.instance_prompt == "sks" and card.data.base_model is None  # tiny://: no Hub repository
    assert "| steps | 2 |" in card.text and 'prompt="sks a red square bouncing across a blue background"' in card.text
    videos = sorted((run / "samples").glob("step-000002-00-*.mp4"))
    assert (run / "lora" / "sample.mp4").read_bytes() == videos[-1].read_bytes()
    exported = export(str(run / "checkpoints" / "step-000002"), str(tmp_path / "out"))
    assert ModelCard.load(exported / "README.md").data.instance_prompt == "sks"

    for hub_id, license, name in (("THUDM/CogVideoX-2b", "apache-2.0", None),
                                  ("THUDM/CogVideoX-5b-I2V", "other", "cogvideox-license")):
        config, variant = load_for_config(build_config({"model": {"path": hub_id}, "data": {"path": "clips"},
                                                        "output_dir": "run"}), validates=False)
        data = model_card(config, variant, 100).data
        assert (data.base_model, data.license, data.license_name) == (hub_id, license, name)
    assert data.pipeline_tag == "image-to-video" and "CogVideoXImageToVideoPipeline" in model_card(
        config, variant, 100).text


def test_a_run_draws_the_same_data_wherever_its_model_folder_sits(make_config, tmp_path):
    """The cache names its files after the model folder's path and file times, so the data order must not follow
    them: the same model moved (or downloaded again) trains the same."""
    from cogft.models.loading import resolve_model_path

    moved = tmp_path / "elsewhere" / "tiny-2b"
    shutil.copytree(resolve_model_path("tiny://2b"), moved)
    runs = [train(make_config(*FAST, "train.max_steps=3", "train.batch_size=2", f"model.path={path}",
                              f"data.cache_dir={tmp_path / name / 'cache'}", out=name))
            for name, path in (("here", "tiny://2b"), ("moved", moved))]
    assert losses(runs[0]) == losses(runs[1])
