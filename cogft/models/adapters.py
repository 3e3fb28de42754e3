"""What is trained: a PEFT LoRA on the frozen transformer, or the whole transformer (SFT), and how it is written
and read back.

Trainable weights are kept in fp32 (master weights) and the frozen base in the variant's dtype;
autocast runs the arithmetic in fp16/bf16. LoRA weights are read and written in the diffusers LoRA
format of the family's pipeline (`Variant.lora_format`) together with their adapter config, so
`lora_alpha != rank` survives a stock pipeline's `load_lora_weights`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..run_dir import LORA_WEIGHTS, TRANSFORMER_DIR
from .fp8 import store_in_fp8
from .trained_modules import load_trained_whole, mark_trained_whole, release_trained_whole, save_trained_whole


def lora_config(config: Config):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        init_lora_weights=True,
        target_modules=list(config.lora.target_modules),
    )


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
    lora_format.save_lora_weights(
        out_dir,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=lora_config(config).to_dict(),
        weight_name=LORA_WEIGHTS,
    )
    save_trained_whole(transformer, out_dir, model_state)
    return Path(out_dir) / LORA_WEIGHTS


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
                     "cogft_version": __version__, "lora_rank": str(config.lora.rank),
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

    state = lora_format.lora_state_dict(str(in_dir), weight_name=LORA_WEIGHTS)
    if isinstance(state, tuple):  # (state_dict, metadata) when metadata is requested/present
        state = state[0]
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{in_dir}: LoRA weights do not match this model: unexpected {result.unexpected_keys[:4]}")
    load_trained_whole(transformer, in_dir)


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
