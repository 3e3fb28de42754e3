"""Modules trained whole beside a LoRA (a control model's widened patch embedding), and their file beside the LoRA's.

A LoRA file holds only adapter weights, and a stock `load_lora_weights` reads nothing else; a module whose shape the
training changed (new input channels) has to travel whole. The transformer records which modules it trains so
(`mark_trained_whole`), as peft records its adapters on the model, so every writer of the LoRA (checkpoints,
the export) writes them too without being told, and every reader loads them if the file is there.
"""

from __future__ import annotations

from pathlib import Path

import torch

TRAINED_MODULES = "trained_modules.safetensors"
_MARK = "cogft_trained_whole"


def mark_trained_whole(transformer: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Make the modules `names` trainable, and record them on the transformer for `save_trained_whole`."""
    for name in names:
        transformer.get_submodule(name).requires_grad_(True)
    setattr(transformer, _MARK, tuple(names))


def trained_whole(transformer: torch.nn.Module) -> tuple[str, ...]:
    return getattr(transformer, _MARK, ())


def save_trained_whole(transformer: torch.nn.Module, out_dir: str | Path,
                       model_state: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Write the recorded modules' weights (fp32, keyed by parameter name) to `out_dir`; None where there are none.
    `model_state`: the whole model's gathered weights, when they are sharded."""
    from safetensors.torch import save_file

    names = trained_whole(transformer)
    if not names:
        return None
    state = model_state if model_state is not None else dict(transformer.named_parameters())
    tensors = {key: value.detach().float().cpu().contiguous() for key, value in state.items()
               if any(key.startswith(name + ".") for name in names)}
    path = Path(out_dir) / TRAINED_MODULES
    save_file(tensors, str(path), metadata={"modules": ",".join(names)})
    return path


def load_trained_whole(transformer: torch.nn.Module, in_dir: str | Path) -> bool:
    """Load `in_dir`'s trained modules into `transformer` (in its parameters' dtype); False where it has none."""
    from safetensors.torch import load_file

    path = Path(in_dir) / TRAINED_MODULES
    if not path.is_file():
        return False
    params = dict(transformer.named_parameters())
    state = load_file(str(path))
    for key, value in state.items():
        if key not in params or params[key].shape != value.shape:
            found = "no such parameter" if key not in params else f"shape {tuple(params[key].shape)}"
            raise ValueError(f"{path}: {key} {tuple(value.shape)} does not fit this model ({found}); it was trained "
                             "on another model (model.path, model.control)")
        with torch.no_grad():
            params[key].copy_(value.to(params[key].dtype))
    return True


def release_trained_whole(folder: Path, dtype: torch.dtype) -> Path | None:
    """Cast a written trained-modules file to the shared dtype (as the LoRA file is); None where there is none."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / TRAINED_MODULES
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key).to(dtype) for key in handle.keys()}  # noqa: SIM118 (no __iter__)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={**metadata, "dtype": str(dtype).removeprefix("torch.")})
    tmp.replace(path)
    return path
