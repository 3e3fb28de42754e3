"""What is trained: a peft adapter on the frozen transformer (`lora.type`: LoRA, DoRA, LoHa, LoKr), or the whole
transformer (SFT), and how it is written and read back.

Trainable weights are kept in fp32 (master weights) and the frozen base in the variant's dtype;
autocast runs the arithmetic in fp16/bf16. LoRA and DoRA weights are read and written in the diffusers LoRA
format of the family's pipeline (`Variant.lora_format`) together with their adapter config, so
`lora_alpha != rank`, rsLoRA's scaling and DoRA's magnitudes survive a stock pipeline's `load_lora_weights`.
That loader reads LoRA keys only, so LoHa and LoKr are written as peft's own files (`PEFT_WEIGHTS`, peft's
state-dict keys such as `...to_q.hada_w1_a`, and `PEFT_CONFIG`), under names `load_lora_weights` does not look
for: it refuses the folder rather than loading nothing. peft (or `cogft export --merge`) loads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..config import Config
from ..optimizers import LR_RATIO
from ..run_dir import LORA_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, TRANSFORMER_DIR, adapter_file
from .fp8 import store_in_fp8
from .trained_modules import load_trained_whole, mark_trained_whole, release_trained_whole, save_trained_whole

STOCK_LOADABLE = ("lora", "dora")  # the `lora.type`s a stock pipeline's `load_lora_weights` reads


def lora_config(config: Config):
    """The peft config of `lora.type` (LoRA and DoRA share peft's LoraConfig)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    lora = config.lora
    common = dict(r=lora.rank, target_modules=list(lora.target_modules))
    if lora.type == "dora":
        _trace_dora_without_breaks()
    if lora.type in STOCK_LOADABLE:
        return LoraConfig(lora_alpha=lora.alpha, lora_dropout=lora.dropout, init_lora_weights=True,
                          use_dora=lora.type == "dora", use_rslora=lora.rslora, **common)
    return (LoHaConfig if lora.type == "loha" else LoKrConfig)(alpha=lora.alpha, **common)


def _trace_dora_without_breaks() -> None:
    """Two things in peft's DoRA layer break torch.compile's graph on every forward, and inside a checkpointed block
    a break sends the whole block to eager mode (measured on an H100: a 5B DoRA step ran every checkpointed block
    unfused, 1.39x plain LoRA's step). Its base-weight helper tests for a torchao weight with
    `type(weight).__module__.startswith(...)`, which dynamo cannot trace: cogft never gives DoRA a quantized base
    (`model.fp8_base` is refused with it), so a plain weight is handed over directly and anything else still goes to
    peft's helper. And each forward in training clears its inference cache (a dict), a side effect a checkpoint
    cannot trace: it is cleared only when it holds something (in training it never does)."""
    from peft.tuners.lora import dora

    peft_helper = dora.dequantize_module_weight
    if getattr(peft_helper, "cogft_plain_first", False):
        return

    def base_weight(module: torch.nn.Module) -> torch.Tensor:
        weight = module.weight
        return weight if type(weight) is torch.nn.Parameter and not hasattr(module, "W_q") else peft_helper(module)

    def clear_if_filled(layer: dora.DoraLinearLayer) -> None:
        if layer._dora_cache:
            layer._dora_cache.clear()

    base_weight.cogft_plain_first = True
    dora.dequantize_module_weight = base_weight
    dora.DoraLinearLayer._cache_clear = clear_if_filled


def optimizer_groups(transformer: torch.nn.Module, config: Config, params: list[torch.nn.Parameter]) -> list:
    """What the optimizer is built over: `params`, or with LoRA+ (`lora.plus_ratio`) two param groups, the B
    matrices at ratio × `train.learning_rate` and the rest (A, DoRA's magnitudes) at it. Each group carries its
    `lr_ratio`, which a resume's `reapply_settings` keeps."""
    ratio = config.lora.plus_ratio
    if ratio is None or config.train.mode != "lora":
        return params
    trained = {id(p) for p in params}
    named = [(name, p) for name, p in transformer.named_parameters() if id(p) in trained]
    b = [p for name, p in named if ".lora_B." in name]
    rest = [p for name, p in named if ".lora_B." not in name]
    lr = config.train.learning_rate
    return [{"params": rest, "lr": lr, LR_RATIO: 1.0}, {"params": b, "lr": lr * ratio, LR_RATIO: ratio}]


def setup_trainable(transformer: torch.nn.Module, config: Config, fp32_master: bool = True,
                    whole_modules: tuple[str, ...] = ()) -> list[torch.nn.Parameter]:
    """Freeze/unfreeze, add the adapter, move trainable weights to fp32; returns the trainable params.

    `fp32_master=False` leaves them in the model's dtype: under DeepSpeed, whose optimizer keeps the fp32
    copy, and for `train.optimizer=adamw_bf16`, which trains bf16 weights directly. `whole_modules`
    (`Variant.trained_with_adapter`): modules a LoRA run trains whole, written beside the LoRA.
    """
    if config.train.mode == "lora":
        transformer.requires_grad_(False)
        try:
            transformer.add_adapter(lora_config(config))
        except ValueError as error:
            raise ValueError(f"lora.target_modules={config.lora.target_modules}: {error}") from None
        mark_trained_whole(transformer, whole_modules)
        if config.model.fp8_base:  # after the adapter, which keeps the model's dtype (store_in_fp8 skips it)
            store_in_fp8(transformer, compute_dtype=transformer.dtype)
    else:
        transformer.requires_grad_(True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if fp32_master:
        for param in params:
            param.data = param.data.float()
    return params


def save_lora(transformer: torch.nn.Module, config: Config, out_dir: str | Path, lora_format,
              model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter in the diffusers LoRA format of `lora_format` (`Variant.lora_format`), with its config as
    metadata.

    `model_state`: the whole model's gathered weights, when they are sharded (DeepSpeed, FSDP).
    """
    from peft.utils import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(transformer, state_dict=model_state)
    state = {k: v.detach().float().cpu() for k, v in adapter.items()}
    if config.lora.type not in STOCK_LOADABLE:
        written = _save_peft(state, config, Path(out_dir))
    else:
        lora_format.save_lora_weights(
            out_dir,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=lora_config(config).to_dict(),
            weight_name=LORA_WEIGHTS,
        )
        written = Path(out_dir) / LORA_WEIGHTS
    save_trained_whole(transformer, out_dir, model_state)  # a control model's widened input, if any
    return written


def _save_peft(state: dict[str, torch.Tensor], config: Config, out_dir: Path) -> Path:
    """LoHa / LoKr: peft's state dict and config, as peft names them (see the module docstring)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    lora_config(config).save_pretrained(str(out_dir))
    save_file(state, str(out_dir / PEFT_WEIGHTS), metadata={"format": "pt"})
    return out_dir / PEFT_WEIGHTS


def release_lora(path: Path, config: Config, model_dtype: torch.dtype) -> Path:
    """Turn a saved LoRA file into the one that is shared: cast to the model's dtype (`lora.export_dtype`), with
    safetensors metadata naming the base model, cogft's version, the rank, alpha and target modules beside the
    adapter config diffusers writes. Checkpoints are never released (their fp32 weights resume exactly)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from .. import __version__

    dtype = model_dtype if config.lora.export_dtype == "auto" else torch.float32
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key).to(dtype) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle has keys() but no __iter__)
    metadata.update({"base_model": config.model.path, "base_model_revision": config.model.revision or "",
                     "cogft_version": __version__, "lora_type": config.lora.type,
                     "lora_rslora": str(config.lora.rslora).lower(), "lora_rank": str(config.lora.rank),
                     "lora_alpha": str(config.lora.alpha),
                     "lora_target_modules": json.dumps(list(config.lora.target_modules)),
                     "dtype": str(dtype).removeprefix("torch.")})
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    release_trained_whole(path.parent, dtype)
    return path


def load_lora_state(transformer: torch.nn.Module, in_dir: str | Path, lora_format) -> None:
    """Restore adapter weights saved by `save_lora` into a transformer that already has the adapter."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if (Path(in_dir) / PEFT_WEIGHTS).is_file():
        state = load_file(str(Path(in_dir) / PEFT_WEIGHTS))
    else:
        state = lora_format.lora_state_dict(str(in_dir), weight_name=LORA_WEIGHTS)
        if isinstance(state, tuple):  # (state_dict, metadata) when metadata is requested/present
            state = state[0]
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{in_dir}: LoRA weights do not match this model: unexpected {result.unexpected_keys[:4]}")
    load_trained_whole(transformer, in_dir)


@contextmanager
def adapter_in_dtype(transformer: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The trained adapter weights cast to `dtype` inside the block, as a stock pipeline of that dtype holds them,
    with compiled blocks run eagerly (no recompile for one forward). Training's autocast rounds only a matmul's
    inputs, so DoRA's magnitude rescale and LoHa's and LoKr's factor products run in fp32 there and in `dtype` in
    the stock pipeline: the export check compares with this."""
    trained = [p for p in transformer.parameters() if p.requires_grad]
    kept = [p.data for p in trained]
    for param in trained:
        param.data = param.data.to(dtype)
    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6; before it a compiled block recompiles
    try:
        with stance("force_eager") if stance is not None else nullcontext():
            yield
    finally:
        for param, data in zip(trained, kept):
            param.data = data


def apply_lora(pipe, weights_dir: Path) -> None:
    """Put the adapter saved in `weights_dir` on a stock pipeline: LoRA / DoRA with its own `load_lora_weights`, LoHa
    / LoKr with peft (their config from `PEFT_CONFIG`), as a user of the export does (the model card shows both)."""
    if (weights_dir / LORA_WEIGHTS).is_file():
        pipe.load_lora_weights(str(weights_dir))
        return
    from peft import PeftConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    pipe.transformer.add_adapter(PeftConfig.from_pretrained(str(weights_dir)))
    result = set_peft_model_state_dict(pipe.transformer, load_file(str(weights_dir / PEFT_WEIGHTS)))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{weights_dir}: adapter weights do not match this model: unexpected "
                         f"{result.unexpected_keys[:4]}")


def adapter_files(weights_dir: Path) -> list[Path]:
    """The files of the adapter in `weights_dir` that an export copies."""
    weights = adapter_file(weights_dir)
    config = weights_dir / PEFT_CONFIG
    return [weights] + ([config] if weights is not None and weights.name == PEFT_WEIGHTS else [])


def save_transformer(transformer: torch.nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None,
                     model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """A diffusers-format transformer folder (sharded like `save_pretrained`); `dtype` casts the weights
    (fp32 master → fp16/bf16 release); `model_state` is the gathered state when the weights are sharded."""
    from huggingface_hub import save_torch_state_dict

    target = Path(out_dir) / TRANSFORMER_DIR
    target.mkdir(parents=True, exist_ok=True)
    transformer.save_config(target)
    state = transformer.state_dict() if model_state is None else model_state
    # own copies: gathered ZeRO-3 weights are views into one flat buffer, which safetensors refuses
    state = {k: v.detach().to(device="cpu", dtype=dtype or v.dtype, copy=True) for k, v in state.items()}
    save_torch_state_dict(state, target, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size="10GB", metadata={"format": "pt"})
    return target


def load_transformer_state(transformer: torch.nn.Module, in_dir: str | Path) -> None:
    from safetensors.torch import load_file

    folder = Path(in_dir) / TRANSFORMER_DIR
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    transformer.load_state_dict(state, strict=True)
