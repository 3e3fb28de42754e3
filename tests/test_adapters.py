"""Adapter types (`lora.type`, `lora.rslora`), LoRA+ (`lora.plus_ratio`) and import-path optimizers: what each
trains, what its export loads into, that it resumes exactly, and what is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogft.config import ConfigError
from cogft.training.loop import train

FAST = ["validation.prompts=[]", "train.checkpoint_every=100", "lora.rank=4", "lora.alpha=8",
        "train.learning_rate=1e-2", "train.lr_warmup_steps=0"]
TYPES = ("lora", "dora", "loha", "lokr")


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache) -> dict[str, Path]:
    """Three steps of each adapter type (LoRA with rsLoRA's scaling) on the tiny 2B."""
    from cogft.config_file import load_config

    repo = Path(__file__).resolve().parent.parent
    trained = {}
    for kind in TYPES:
        out = tmp_path_factory.mktemp(kind)
        extra = ["lora.rslora=true"] if kind == "lora" else []
        config = load_config(repo / "configs" / "tiny-lora.yaml", [
            f"data.path={repo / 'data'}", f"data.cache_dir={shared_cache}", f"output_dir={out / 'run'}",
            "tracking.report_to=none", *FAST, "train.max_steps=3", f"lora.type={kind}", *extra])
        trained[kind] = train(config)
    return trained


def probe_input() -> dict[str, torch.Tensor]:
    """A fixed transformer input of the tiny 2B (3 latent frames of 4x8x12, 16 prompt tokens)."""
    generator = torch.Generator().manual_seed(7)
    return {"hidden_states": torch.randn(1, 3, 4, 8, 12, generator=generator),
            "encoder_hidden_states": torch.randn(1, 16, 32, generator=generator),
            "timestep": torch.tensor([500])}


def predict(transformer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0].float()


def trained_prediction(run: Path, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(cogft's own model: the base with the adapter built by `setup_trainable` and the final checkpoint's fp32
    weights, the base alone), in fp32."""
    from diffusers import CogVideoXTransformer3DModel

    from cogft.config_file import load_config
    from cogft.models.adapters import load_lora_state, setup_trainable
    from cogft.models.loading import load_variant, resolve_model_path

    config = load_config(run / "config.yaml", [])
    transformer = CogVideoXTransformer3DModel.from_pretrained(resolve_model_path("tiny://2b"), subfolder="transformer")
    base = predict(transformer, inputs)
    setup_trainable(transformer, config)
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    load_lora_state(transformer, checkpoint, load_variant("tiny://2b", "auto").lora_format)
    return predict(transformer, inputs), base


STOCK_PREDICT = r"""
import sys, torch
from diffusers import CogVideoXPipeline
from safetensors.torch import load_file, save_file
pipe = CogVideoXPipeline.from_pretrained(sys.argv[1], dtype=torch.float32)
inputs = load_file(sys.argv[2])
for name, folder in zip(("lora", "dora"), sys.argv[4:]):
    pipe.load_lora_weights(folder, adapter_name=name)
    pipe.set_adapters(name)
    layer = pipe.transformer.transformer_blocks[0].attn1.to_q
    with torch.no_grad():
        tuned = pipe.transformer(**inputs, return_dict=False)[0].float()
    save_file({"tuned": tuned.contiguous()}, f"{sys.argv[3]}/{name}.safetensors")
    print(layer.scaling[name], bool(layer.use_dora[name]))
assert "cogft" not in sys.modules
"""


def test_lora_and_dora_exports_load_in_a_stock_pipeline_without_cogft(runs, tmp_path):
    """The plain exports, read by `CogVideoXPipeline.load_lora_weights` in a process that cannot import cogft,
    predict what cogft's own trained models predict (rsLoRA's alpha/sqrt(r) and DoRA's magnitudes honoured)."""
    from cogft.inference.export import export
    from cogft.models.loading import resolve_model_path

    folders = [export(str(runs[kind]), str(tmp_path / kind)) for kind in ("lora", "dora")]
    assert all((folder / "pytorch_lora_weights.safetensors").is_file() for folder in folders)
    inputs = probe_input()
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    result = subprocess.run(
        [sys.executable, "-c", STOCK_PREDICT, resolve_model_path("tiny://2b"), str(tmp_path / "inputs.safetensors"),
         str(tmp_path), *map(str, folders)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, cwd="/",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.split()[-4:]
    assert float(printed[0]) == pytest.approx(8 / 4 ** 0.5) and printed[1] == "False"  # rsLoRA's alpha / sqrt(r)
    assert float(printed[2]) == pytest.approx(8 / 4) and printed[3] == "True"  # DoRA, alpha / r
    for kind in ("lora", "dora"):
        stock = load_file(tmp_path / f"{kind}.safetensors")["tuned"]
        trained, base = trained_prediction(runs[kind], inputs)
        effect = (trained - base).norm()
        assert effect > 1e-3 * base.norm()  # the adapter changes the output
        assert (stock - trained).norm() < 0.02 * effect  # the export's weights are fp16 (the 2B's dtype)


@pytest.mark.parametrize("kind", TYPES)
def test_merged_export_of_each_type_reproduces_the_trained_prediction(runs, kind, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    from cogft.inference.export import export

    merged = export(str(runs[kind]), str(tmp_path / "merged"), merge=True)
    transformer = CogVideoXTransformer3DModel.from_pretrained(merged, subfolder="transformer", dtype=torch.float32)
    assert not any("lora" in name or "hada" in name or "lokr" in name for name, _ in transformer.named_parameters())
    inputs = probe_input()
    trained, base = trained_prediction(runs[kind], inputs)
    got = predict(transformer, inputs)
    assert (trained - base).norm() > 1e-3 * base.norm()
    assert (got - trained).norm() < 0.05 * (trained - base).norm()  # merged in fp16, the 2B's dtype


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_export_peft_files_that_the_stock_loader_refuses_rather_than_loading_nothing(runs, kind,
                                                                                                   tmp_path):
    from diffusers import CogVideoXPipeline

    from cogft.inference.export import export
    from cogft.models.adapters import apply_lora
    from cogft.models.loading import resolve_model_path

    folder = export(str(runs[kind]), str(tmp_path / "export"))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    keys = list(load_file(folder / "adapter_model.safetensors"))
    assert all((".hada_" if kind == "loha" else ".lokr_") in key for key in keys)  # peft's own state-dict keys
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == kind.upper()
    assert "add_adapter" in (folder / "README.md").read_text()  # the card says how to load it
    pipe = CogVideoXPipeline.from_pretrained(resolve_model_path("tiny://2b"), dtype=torch.float32)
    with pytest.raises((OSError, ValueError)):  # no file of its name: refused, never an empty adapter
        pipe.load_lora_weights(str(folder))
    apply_lora(pipe, folder)  # what the model card tells a user to do
    inputs = probe_input()
    trained, base = trained_prediction(runs[kind], inputs)
    assert (predict(pipe.transformer, inputs) - trained).norm() < 0.02 * (trained - base).norm()


def test_sample_and_resume_read_peft_files(runs, tmp_path):
    """`cogft sample` of a LoKr run (its final export and its checkpoint) renders through peft's files."""
    from cogft.inference.sampling import sample

    run = runs["lokr"]
    assert (run / "checkpoints" / "step-000003" / "adapter_model.safetensors").is_file()
    video = sample(str(run / "checkpoints" / "step-000003"), "a red square", str(tmp_path / "ckpt.mp4"), steps=2)
    assert video.is_file() and video.stat().st_size > 0


def test_lora_plus_gives_b_its_ratio_of_the_learning_rate(make_config):
    """Read back from each optimizer of the table that runs here (and an import-path one): B at ratio × lr."""
    from diffusers import CogVideoXTransformer3DModel

    from cogft.models.adapters import optimizer_groups, setup_trainable
    from cogft.models.loading import resolve_model_path
    from cogft.optimizers import OPTIMIZERS, Launch, build_optimizer

    names = [*OPTIMIZERS, "torch.optim.Adafactor"]
    for kind, name in [(kind, name) for kind in ("lora", "dora") for name in names]:
        entry = OPTIMIZERS.get(name)
        if entry is not None and entry.problem(Launch(device="cpu", variant="tiny", dtype=torch.bfloat16)):
            continue  # adamw8bit needs a GPU, prodigy its package
        config = make_config("lora.plus_ratio=16", "train.learning_rate=2e-4", f"lora.type={kind}",
                             f"train.optimizer={name}")
        bf16 = entry is not None and entry.bf16_weights
        transformer = CogVideoXTransformer3DModel.from_pretrained(
            resolve_model_path("tiny://2b"), subfolder="transformer", dtype=torch.bfloat16 if bf16 else None)
        params = setup_trainable(transformer, config, fp32_master=not bf16)
        names_of = {id(p): n for n, p in transformer.named_parameters()}
        optimizer = build_optimizer(config.train, optimizer_groups(transformer, config, params), torch.device("cpu"))
        rest, b = optimizer.param_groups
        assert b["lr"] == pytest.approx(16 * rest["lr"]) and rest["lr"] == pytest.approx(2e-4), name
        assert {names_of[id(p)].split(".")[-3] for p in b["params"]} == {"lora_B"}
        kept = {names_of[id(p)].split(".")[-3] for p in rest["params"]}
        assert kept == ({"lora_A", "lora_magnitude_vector"} if kind == "dora" else {"lora_A"})
        assert len(b["params"]) + len(rest["params"]) == len(params)
    config = make_config("train.learning_rate=2e-4")
    transformer = CogVideoXTransformer3DModel.from_pretrained(resolve_model_path("tiny://2b"), subfolder="transformer")
    params = setup_trainable(transformer, config)
    assert optimizer_groups(transformer, config, params) == params  # off: one group, as before


def straight_and_resumed(make_config, overrides: list[str]) -> tuple[dict, Path]:
    """5 steps straight and 2 + a resume to 5: their losses and final weights are asserted equal; returns the
    weights and the resumed run."""
    straight = train(make_config(*overrides, "train.max_steps=5", out="straight"))
    train(make_config(*overrides, "train.max_steps=2", out="resumed"))
    resumed = train(make_config(*overrides, "train.max_steps=5", out="resumed"))
    assert len(losses(straight)) == 5 and losses(straight) == losses(resumed)
    a, b = (load_file(run / "checkpoints" / "step-000005" / "pytorch_lora_weights.safetensors")
            for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a, resumed


def test_dora_with_lora_plus_resumes_bit_exactly(make_config):
    weights, resumed = straight_and_resumed(make_config, [*FAST, "lora.type=dora", "lora.plus_ratio=4"])
    assert any("lora_magnitude_vector" in key for key in weights)
    groups = torch.load(resumed / "checkpoints" / "step-000005" / "optimizer.bin", weights_only=False)["param_groups"]
    assert [group["lr"] for group in groups] == pytest.approx([1e-2, 4e-2])  # restored with their ratio


def test_an_import_path_optimizer_trains_and_resumes_bit_exactly(make_config):
    overrides = [*FAST, "train.optimizer=torch.optim.Adafactor", "train.optimizer_args={beta2_decay: -0.7}"]
    _, resumed = straight_and_resumed(make_config, overrides)
    saved = torch.load(resumed / "checkpoints" / "step-000005" / "optimizer.bin", weights_only=False)
    assert saved["param_groups"][0]["beta2_decay"] == -0.7 and saved["state"]  # Adafactor's own state, with the args
    assert any("row_var" in state for state in saved["state"].values())


@pytest.mark.parametrize(("overrides", "key", "fix"), [
    (["train.optimizer=torch.optim.Adafactorr"], "train.optimizer", "has no Adafactorr"),
    (["train.optimizer=nowhere_module.Opt"], "train.optimizer", "does not import"),
    (["train.optimizer=torch.nn.Linear"], "train.optimizer", "not a torch.optim.Optimizer"),
    (["train.optimizer=adam"], "train.optimizer", "import path"),
    (["train.optimizer=torch.optim.Adafactor", "train.optimizer_args={betas: [0.9, 0.99]}"],
     "train.optimizer_args", "it takes"),
    (["train.optimizer=torch.optim.Adafactor", "train.optimizer_args={lr: 0.1}"], "train.optimizer_args",
     "train.learning_rate"),
    (["train.optimizer=torch.optim.Adafactor", "train.optimizer_args={beta2_decay: 0.5}"], "train.optimizer_args",
     "beta2_decay should be <= 0"),
    (["train.optimizer_args={eps: 0.1}"], "train.optimizer_args", "train.* keys"),
    (["lora.type=loha", "lora.rslora=true"], "lora", "lora.rslora"),
    (["lora.type=lokr", "lora.plus_ratio=16"], "lora", "lora.plus_ratio"),
    (["lora.type=lokr", "lora.dropout=0.1"], "lora", "lora.dropout"),
    (["lora.type=dorra"], "lora.type", "dora"),
    (["lora.plus_ratio=-1"], "lora.plus_ratio", "greater than 0"),
    (["lora.type=dora", "model.fp8_base=true"], "model.fp8_base", "lora.type=lora"),
    (["lora.type=dora", "train.mode=sft"], "lora.type", "train.mode=lora"),
])
def test_bad_adapter_and_optimizer_values_are_refused_by_key(make_config, overrides, key, fix):
    with pytest.raises(ConfigError) as refused:
        make_config(*overrides)
    assert key in str(refused.value) and fix in str(refused.value)


def test_estimate_knows_each_adapter_and_an_import_path_optimizer(make_config):
    from cogft.config_file import load_config
    from cogft.models.cost import estimate
    from cogft.models.loading import load_variant
    from cogft.optimizers import optimizer_entry

    def of(*overrides):
        config = load_config(Path(__file__).resolve().parent.parent / "configs" / "cogvideox-5b-lora.yaml",
                             ["train.gradient_checkpointing=false", "train.compile=true", *overrides])
        return estimate(config, load_variant(config.model.path, config.model.dtype), "H100")

    lora, dora, lokr = of(), of("lora.type=dora"), of("lora.type=lokr")
    trainable = {name: result.parts_gib["trainable_state"] for name, result in
                 (("lora", lora), ("dora", dora), ("lokr", lokr))}
    assert trainable["lokr"] < trainable["lora"] < trainable["dora"]  # LoKr's factors are far smaller
    # measured on an H100 (docs/performance.md): DoRA 1.028x LoRA's step (its layers compiled), LoKr 1.30x
    assert 1.01 * lora.seconds_per_step < dora.seconds_per_step < 1.06 * lora.seconds_per_step
    assert lora.parts_gib["activations"] < dora.parts_gib["activations"]  # the magnitude's kept outputs
    assert 1.15 * lora.seconds_per_step < lokr.seconds_per_step < 1.5 * lora.seconds_per_step  # the whole delta
    adafactor = optimizer_entry(make_config("train.optimizer=torch.optim.Adafactor").train)
    assert adafactor.state_measured and 0 < adafactor.state_bytes < 1  # factored: row and column statistics
    assert of("train.optimizer=torch.optim.Adafactor").parts_gib["trainable_state"] < trainable["lora"]


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_the_export_check_and_validation_run_for_dora_and_lokr(make_config, kind):
    """The run validates (its in-memory adapter), then the fresh-process export check loads its export into the
    stock pipeline and predicts what the trained model predicts with its adapter weights in the model's dtype, as
    the stock pipeline holds them (training's autocast runs DoRA's rescale and LoKr's factor product in fp32)."""
    run = train(make_config(*FAST, f"lora.type={kind}", "train.max_steps=2", "validation.prompts=[a red ball]",
                            "validation.num_inference_steps=2", "validation.check_export=true", out="checked"))
    assert sorted(p.name for p in (run / "samples").glob("*.mp4"))
    check = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "export_check/match" in row][0]
    assert check["export_check/match"] == 1.0 and check["export_check/prediction_lora_effect"] > 0
    assert check["export_check/prediction_gap"] <= check["export_check/tolerance"]
    assert 0 < check["export_check/adapter_dtype_gap"] < 0.1 * check["export_check/prediction_lora_effect"]


def test_a_compiled_checkpointed_dora_layer_runs_as_one_graph(make_config):
    """DoRA under per-block compile and gradient checkpointing: adapted layers trace as one graph (peft's base-weight
    helper and its cache clearing broke the graph on every forward, and a break inside a checkpoint sends the whole
    block to eager mode)."""
    from peft import get_peft_model
    from torch.utils.checkpoint import checkpoint

    from cogft.models.adapters import lora_config

    layer = torch.nn.ModuleDict({"to_q": torch.nn.Linear(32, 32), "to_k": torch.nn.Linear(32, 32)})
    layer.forward = lambda x: layer.to_k(torch.nn.functional.gelu(layer.to_q(x)))
    config = make_config("lora.type=dora", "lora.rank=4", "lora.target_modules=[to_q,to_k]")
    adapted = get_peft_model(layer, lora_config(config)).base_model.model.train()
    compiled = torch.compile(lambda x: checkpoint(adapted.forward, x, use_reentrant=False), fullgraph=True,
                             backend="eager")  # fullgraph: a graph break raises
    x = torch.randn(3, 32, requires_grad=True)
    compiled(x).sum().backward()
    assert x.grad is not None and adapted.to_q.lora_magnitude_vector["default"].weight.grad is not None
