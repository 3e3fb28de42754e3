"""The LoRA export in ComfyUI's key formats (`lora.export_format`, `cogft export --format`), checked against each
loader's own key rules, restated here from their source (nothing of theirs is imported or copied):

ComfyUI, Comfy-Org/ComfyUI (formerly comfyanonymous/ComfyUI) at commit 783545f689a0af730065994b46b382ae24844c99
(CogVideoX support came in 5eeae3f1d823e3f072896d6c72185e3c84373739, #13402):
- comfy/ldm/cogvideo/model.py: the model's layers. Per block `norm1.linear`, `norm1.norm`, `q`, `k`, `v`, `norm_q`,
  `norm_k`, `attn_out`, `norm2.linear`, `norm2.norm`, `ff_proj`, `ff_out` (q/k/v/attn_out are diffusers' attn1.to_q,
  to_k, to_v, to_out.0; ff_proj/ff_out its ff.net.0.proj and ff.net.2), under `blocks.N`; outside them
  `patch_embed.proj` (a patch convolution, a Linear for patch_size_t), `patch_embed.text_proj`,
  `time_embedding_linear_1/2`, `ofs_embedding_linear_1/2` (with ofs_embed_dim), `norm_final`, `norm_out.linear`,
  `norm_out.norm`, `proj_out`. The model sits under `diffusion_model.` in the state dict; model_detection.py reads a
  checkpoint in these names (no diffusers-name conversion exists for CogVideoX).
- comfy/lora.py `model_lora_keys_unet`: for every state-dict key `diffusion_model.X.weight` the LoRA names
  `lora_unet_` + X with dots as underscores, and `diffusion_model.X`, both point at it (CogVideoX gets no
  model-specific names: `unet_to_diffusers` gives nothing for a config without `num_res_blocks`).
- comfy/lora.py `load_lora` with comfy/weight_adapter/{lora,loha,lokr}.py: for each such name x, `x.alpha` (a scalar,
  `.item()`) and `x.dora_scale` are read; LoRA from `x.lora_up.weight` and `x.lora_down.weight` (among other
  spellings), its update alpha / down.shape[0] * up @ down (1 with no alpha); LoHa from `x.hada_w1_a`, `_w1_b`,
  `_w2_a`, `_w2_b`: alpha / w1_b.shape[0] * (w1_a @ w1_b) * (w2_a @ w2_b); LoKr from `x.lokr_w1` or `x.lokr_w1_a` @
  `x.lokr_w1_b`, and `x.lokr_w2` or `_w2_a` @ `_w2_b`: kron(w1, w2) times alpha / (the rank of the last low-rank
  factor, w2's before w1's), or times 1 when both are whole. Every other key is logged "lora key not loaded".

kijai/ComfyUI-CogVideoXWrapper at commit fdb8abd2790b5459ddc7066c31861bb0b62e988b:
- model_loading.py (the model loaders' LoRA step): a file with any key containing "lora_B" goes to diffusers'
  `load_lora_weights`; any other to lora_utils.merge_lora, for the stock and the Fun models alike, on the Wrapper's
  transformer, which keeps diffusers' module names.
- lora_utils.py `merge_lora`: keys are grouped by the part before the first dot; the group name after its last
  "lora_unet_" is split at underscores and walked from the transformer by attribute, joining the next piece with "_"
  whenever a name is not found; the group's `lora_up.weight` and `lora_down.weight` are merged as
  alpha / up.shape[1] * up @ down (1 with no `alpha`); other tensors of a group are never read.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cogft.config import ConfigError

ALL_LINEARS = "[to_q,to_k,to_v,to_out.0,net.0.proj,net.2,linear,text_proj,linear_1,linear_2,proj_out]"
FAST = ["validation.prompts=[]", "train.checkpoint_every=100", "train.max_steps=1", "train.learning_rate=1e-2",
        "train.lr_warmup_steps=0", "tracking.report_to=none"]
# every Linear adapted; alpha != rank (rsLoRA's alpha / sqrt(r) on the 2B); LoKr with whole and low-rank factors
RUNS = {
    "2b": ["model.path=tiny://2b", "lora.rank=4", "lora.alpha=8", "lora.rslora=true",
           f"lora.target_modules={ALL_LINEARS}", "lora.export_format=[comfyui,kohya]", "train.ema_decay=0.5"],
    "5b": ["model.path=tiny://5b", "lora.rank=4", "lora.alpha=3", f"lora.target_modules={ALL_LINEARS}"],
    "loha": ["model.path=tiny://2b", "lora.type=loha", "lora.rank=4", "lora.alpha=6",
             "lora.target_modules=[to_q,to_out.0,net.0.proj,net.2]"],
    "lokr": ["model.path=tiny://2b", "lora.type=lokr", "lora.rank=4", "lora.alpha=6",
             "lora.target_modules=[to_q,to_out.0,net.0.proj,net.2]"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache) -> dict[str, Path]:
    """One step of each adapter on the tiny models (the 2B's config asks for both ComfyUI formats itself, and averages
    its weights: the export is the average, raw/ the trained weights)."""
    from cogft.config_file import load_config
    from cogft.training.loop import train

    repo = Path(__file__).resolve().parent.parent
    trained = {}
    for name, overrides in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        trained[name] = train(load_config(repo / "configs" / "tiny-lora.yaml", [
            f"data.path={repo / 'data'}", f"data.cache_dir={shared_cache}", f"output_dir={out / 'run'}", *FAST,
            *overrides]))
    return trained


# --- ComfyUI's own loader, restated -------------------------------------------------------------------------------

def comfyui_state_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The weight shapes of ComfyUI's CogVideoX model for a diffusers transformer config, by state-dict key."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    time, head = config["time_embed_dim"], config["attention_head_dim"]
    patch, patch_t = config["patch_size"], config.get("patch_size_t")
    shapes = {"patch_embed.text_proj": (dim, config["text_embed_dim"]), "time_embedding_linear_1": (time, dim),
              "time_embedding_linear_2": (time, time), "norm_out.linear": (2 * dim, time),
              "proj_out": (patch * patch * (patch_t or 1) * config["out_channels"], dim)}
    shapes["patch_embed.proj"] = ((dim, config["in_channels"], patch, patch) if patch_t is None
                                  else (dim, config["in_channels"] * patch * patch * patch_t))
    if config.get("ofs_embed_dim"):
        ofs = config["ofs_embed_dim"]
        shapes.update({"ofs_embedding_linear_1": (ofs, ofs), "ofs_embedding_linear_2": (ofs, ofs)})
    for i in range(config["num_layers"]):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in (
            ("norm1.linear", (6 * dim, time)), ("norm2.linear", (6 * dim, time)), ("q", (dim, dim)), ("k", (dim, dim)),
            ("v", (dim, dim)), ("attn_out", (dim, dim)), ("ff_proj", (4 * dim, dim)), ("ff_out", (dim, 4 * dim)),
            ("norm1.norm", (dim,)), ("norm2.norm", (dim,)), ("norm_q", (head,)), ("norm_k", (head,)))})
    shapes.update({"norm_final": (dim,), "norm_out.norm": (dim,)})
    return {f"diffusion_model.{name}.weight": shape for name, shape in shapes.items()}


def comfyui_patches(lora: dict[str, torch.Tensor], state: dict[str, tuple[int, ...]]):
    """({model weight key: the update ComfyUI adds}, the keys it would log as "lora key not loaded")."""
    key_map = {}
    for key in state:
        stem = key.removeprefix("diffusion_model.").removesuffix(".weight")
        key_map["lora_unet_" + stem.replace(".", "_")] = key
        key_map[key.removesuffix(".weight")] = key
    patches, loaded = {}, set()

    def read(name):
        loaded.add(name)
        return lora[name].float()

    for x, target in key_map.items():
        alpha = read(f"{x}.alpha").item() if f"{x}.alpha" in lora else None
        assert f"{x}.dora_scale" not in lora
        if f"{x}.lora_up.weight" in lora:
            up, down = read(f"{x}.lora_up.weight"), read(f"{x}.lora_down.weight")
            update = (up.flatten(1) @ down.flatten(1)) * (1.0 if alpha is None else alpha / down.shape[0])
        elif f"{x}.hada_w1_a" in lora:
            w1a, w1b, w2a, w2b = (read(f"{x}.hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
            update = (w1a @ w1b) * (w2a @ w2b) * (1.0 if alpha is None else alpha / w1b.shape[0])
        elif any(f"{x}.lokr_{n}" in lora for n in ("w1", "w1_a", "w2", "w2_a")):
            rank = None
            factors = []
            for n in ("w1", "w2"):
                if f"{x}.lokr_{n}" in lora:
                    factors.append(read(f"{x}.lokr_{n}"))
                else:
                    a, b = read(f"{x}.lokr_{n}_a"), read(f"{x}.lokr_{n}_b")
                    factors.append(a @ b)
                    rank = b.shape[0]
            update = torch.kron(*factors) * (alpha / rank if alpha is not None and rank is not None else 1.0)
        else:
            continue
        patches[target] = update.reshape(state[target])
    return patches, set(lora) - loaded


# --- kijai's ComfyUI-CogVideoXWrapper, restated ---------------------------------------------------------------------

def attribute(module: torch.nn.Module, name: str):
    """`module.__getattr__(name)` as torch answers it: a submodule, parameter or buffer of that name (never a method:
    `to` is not an attribute there); None where it raises."""
    return next((found[name] for found in (module._parameters, module._buffers, module._modules) if name in found),
                None)


def wrapper_merges(transformer: torch.nn.Module, lora: dict[str, torch.Tensor]):
    """({diffusers module name: the update merge_lora adds}, tensors of a group it never reads)."""
    assert not any("lora_B" in key for key in lora)  # else the Wrapper would hand the file to load_lora_weights
    names = {id(module): name for name, module in transformer.named_modules()}
    groups = defaultdict(dict)
    for key, tensor in lora.items():
        layer, element = key.split(".", 1)
        groups[layer][element] = tensor.float()
    merges, unread = {}, []
    for layer, elements in groups.items():
        pieces = layer.split("lora_unet_")[-1].split("_")
        module, name = transformer, pieces.pop(0)
        while True:  # its walk: a name that is not an attribute takes the next piece after an underscore
            child = attribute(module, name)
            if child is not None:
                module = child
                if not pieces:
                    break
                name = pieces.pop(0)
            else:
                assert pieces, f"{layer}: no module of that name"
                name = f"{name}_{pieces.pop(0)}" if name else pieces.pop(0)
        up, down = elements["lora_up.weight"], elements["lora_down.weight"]
        scale = elements["alpha"].item() / up.shape[1] if "alpha" in elements else 1.0
        merges[names[id(module)]] = scale * (up @ down)
        unread += [f"{layer}.{e}" for e in elements if e not in ("lora_up.weight", "lora_down.weight", "alpha")]
    return merges, unread


# --- what the trained adapter adds, read the stock way ----------------------------------------------------------------

def stock_updates(folder: Path, model: str) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """{module name: the update} of the export's diffusers / peft file, loaded as the model card says."""
    from diffusers import CogVideoXPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    from cogft.models.adapters import apply_lora
    from cogft.models.loading import resolve_model_path

    pipe = CogVideoXPipeline.from_pretrained(resolve_model_path(model), dtype=torch.float32)
    apply_lora(pipe, folder)
    layers = {name: m for name, m in pipe.transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    updates = {name: m.get_delta_weight(m.active_adapters[0]).float().detach() for name, m in layers.items()}
    return updates, pipe.transformer


# the test's own reading of comfy/ldm/cogvideo/model.py's forward: which diffusers layer each of its layers is
IN_BLOCK = {"attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out",
            "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out", "norm1.linear": "norm1.linear",
            "norm2.linear": "norm2.linear"}
OUTSIDE = {"time_embedding.linear_1": "time_embedding_linear_1", "time_embedding.linear_2": "time_embedding_linear_2",
           "patch_embed.text_proj": "patch_embed.text_proj", "norm_out.linear": "norm_out.linear",
           "proj_out": "proj_out"}


def comfyui_weight_of(module: str) -> str:
    if module.startswith("transformer_blocks."):
        _, index, rest = module.split(".", 2)
        return f"diffusion_model.blocks.{index}.{IN_BLOCK[rest]}.weight"
    return f"diffusion_model.{OUTSIDE[module]}.weight"


def assert_same_updates(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every adapted module has its update (none missing, none extra), equal to the stock one (both from the same
    export-dtype weights, in fp32 arithmetic on each side)."""
    assert sorted(got) == sorted(want)
    for name, update in want.items():
        assert update.abs().max() > 0, name  # trained: B moved off zero
        torch.testing.assert_close(got[name], update, rtol=1e-5, atol=1e-6 * update.abs().max().item(), msg=name)


@pytest.mark.parametrize("name", ["2b", "5b", "loha", "lokr"])
def test_comfyui_file_loads_every_tensor_into_a_layer_at_the_trained_strength(runs, name, tmp_path):
    """ComfyUI's loader, restated, finds a layer of its CogVideoX model for every tensor of lora_comfyui.safetensors
    (no "lora key not loaded"), patches every adapted layer, and adds what the stock diffusers/peft load adds."""
    from cogft.inference.export import export

    run = runs[name]
    folder = run / "lora" if name == "2b" else export(str(run), str(tmp_path / "export"), formats=["comfyui"])
    lora = load_file(folder / "lora_comfyui.safetensors")
    model = RUNS[name][0].removeprefix("model.path=")
    want, transformer = stock_updates(folder, model)
    patches, not_loaded = comfyui_patches(lora, comfyui_state_shapes(dict(transformer.config)))
    assert not not_loaded
    assert_same_updates(patches, {comfyui_weight_of(module): update for module, update in want.items()})
    if name == "lokr":  # both of ComfyUI's LoKr scales: whole factors (scale folded in) and a low-rank w2 (alpha)
        alphas = {k for k in lora if k.endswith(".alpha")}
        assert 0 < len(alphas) < len(want)


@pytest.mark.parametrize("name", ["2b", "5b"])
def test_kohya_file_merges_every_tensor_into_its_layer_in_the_wrapper(runs, name, tmp_path):
    """The Wrapper's merge_lora, restated, walks every group of lora_kohya.safetensors to a layer of the transformer,
    reads every tensor, and merges what the stock load adds, alpha carried per module."""
    from cogft.inference.export import export

    run = runs[name]
    folder = run / "lora" if name == "2b" else export(str(run), str(tmp_path / "export"), formats=["kohya"])
    lora = load_file(folder / "lora_kohya.safetensors")
    want, transformer = stock_updates(folder, RUNS[name][0].removeprefix("model.path="))
    merges, unread = wrapper_merges(transformer, lora)
    assert not unread
    assert_same_updates(merges, want)
    dtypes = {key.rsplit(".", 1)[-1] == "alpha": {t.dtype} for key, t in lora.items()}
    assert dtypes == {True: {torch.float32}, False: {torch.float16 if name == "2b" else torch.bfloat16}}


def test_the_card_names_each_file_and_the_diffusers_file_still_loads_alone(runs):
    """The run's lora/ (the 2B run asked for both formats) holds the three files, and so does raw/lora/ (the weights
    before averaging); the card says which is for what; the stock loader still takes the diffusers file alone."""
    folder = runs["2b"] / "lora"
    for each in (folder, runs["2b"] / "raw" / "lora"):
        assert {p.name for p in each.glob("*.safetensors")} == {"pytorch_lora_weights.safetensors",
                                                                "lora_comfyui.safetensors", "lora_kohya.safetensors"}
    card = (folder / "README.md").read_text()
    assert "lora_comfyui.safetensors" in card and "Load LoRA" in card
    assert "lora_kohya.safetensors" in card and "CogVideoXWrapper" in card


@pytest.mark.parametrize(("overrides", "words"), [
    (["lora.type=dora", "lora.export_format=comfyui"], ["lora.export_format=comfyui", "dora", "another strength"]),
    (["lora.type=dora", "lora.export_format=kohya"], ["lora.export_format=kohya", "dora"]),
    (["lora.type=loha", "lora.export_format=[comfyui,kohya]"], ["lora.export_format=kohya", "loha"]),
    (["train.mode=sft", "lora.export_format=comfyui"], ["lora.export_format=comfyui", "full fine-tune"]),
    (["lora.target_modules=[to_q,proj]", "lora.export_format=kohya"],  # proj: ff.net.0.proj and the patch conv
     ["lora.export_format=kohya", "patch_embed.proj, not a Linear layer"]),
    (["model.control=true", "data.control=canny", "validation.prompts=[]", "lora.export_format=comfyui"],
     ["lora.export_format=comfyui", "patch_embed.proj"]),
])
def test_a_format_that_cannot_load_the_adapter_as_trained_is_refused_by_key_before_prepare(make_config, overrides,
                                                                                            words):
    from cogft.models.loading import load_for_config

    with pytest.raises(ConfigError) as refused:
        load_for_config(make_config(*overrides))
    assert all(word in str(refused.value) for word in words), str(refused.value)


def test_a_family_without_a_layer_for_a_target_or_without_the_format_is_refused(make_config):
    from cogft.models.loading import variant_of
    from cogft.models.lora_formats import ToolNames, check_export_formats

    config = make_config("lora.target_modules=[to_q,proj_out]")
    real = variant_of(config.model)
    partial = SimpleNamespace(spec=real.spec, configs=real.configs, trained_with_adapter=(),
                              lora_key_formats={"comfyui": ToolNames(lambda n: None if n == "proj_out" else n, "")})
    with pytest.raises(ConfigError, match=r"--format=comfyui: lora.target_modules adapts proj_out"):
        check_export_formats(["comfyui"], config, partial, key="--format")
    with pytest.raises(ConfigError, match=r"--format=kohya: the cogvideox family has no kohya key format"):
        check_export_formats(["kohya"], config, partial, key="--format")


def test_cli_export_format_is_checked_before_anything_is_written(runs, tmp_path, capsys):
    from cogft.cli import main

    for args, words in ((["--format", "kohya"], "--format=kohya cannot carry lora.type=loha"),
                        (["--format", "comfyu"], "--format: unknown format 'comfyu'"),
                        (["--format", "comfyui", "--merge"], "--merge a whole diffusers pipeline")):
        out = tmp_path / "x"
        assert main(["export", "--from", str(runs["loha"]), "--out", str(out), *args]) == 2
        assert words in capsys.readouterr().err and not out.exists(), args
    assert main(["export", "--from", str(runs["loha"]), "--out", str(tmp_path / "ok"), "--format", "comfyui"]) == 0
    assert (tmp_path / "ok" / "lora_comfyui.safetensors").is_file()
    assert not (tmp_path / "ok" / "pytorch_lora_weights.safetensors").exists()  # LoHa: peft's files, as before
    from diffusers import CogVideoXPipeline

    from cogft.models.loading import resolve_model_path

    pipe = CogVideoXPipeline.from_pretrained(resolve_model_path("tiny://2b"), dtype=torch.float32)
    with pytest.raises(ValueError):  # whichever file it picks, the stock loader still refuses, never loads nothing
        pipe.load_lora_weights(str(tmp_path / "ok"))
