"""Publishing an export on the Hugging Face Hub: `cogft export --push-to-hub` and `tracking.push_to_hub`.

What would fail the push (an id the Hub refuses, no login, offline mode) is refused before any work, so a long
run never ends on a refusal it could have had at its start; an upload that fails keeps the local export and says
how to push it again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config, ConfigError
from ..run_dir import LORA_DIR, TRANSFORMER_DIR
from .model_card import CARD_FILE

logger = logging.getLogger(__name__)


class HubPushError(ConfigError):
    """An upload that failed; nothing local is lost, and the message says how to push again."""


def check_hub_push(repo_id: str, key: str) -> None:
    """Refuse now what would make the push fail later. `key`: the option or config key that asked for it."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = "/" in repo_id
    except HFValidationError:
        valid = False
    if not valid:
        raise ConfigError(f"{key}={repo_id}: not a Hugging Face model repository id; give OWNER/NAME (letters, digits, "
                          "'-', '_', '.'), e.g. my-name/cogvideox-lora")
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{key}={repo_id}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so the upload would "
                          f"fail; unset it, or leave out {key} and push later with cogft export --push-to-hub")
    if get_token() is None:
        raise ConfigError(f"{key}={repo_id}: no Hugging Face login found; run `hf auth login` (`huggingface-cli "
                          "login` before huggingface_hub 1.0) or set HF_TOKEN to a token with write access, or "
                          f"leave out {key}")


def check_run_push(config: Config) -> None:
    """`tracking.push_to_hub`, checked before training (the push itself comes after the export)."""
    if config.tracking.push_to_hub:
        check_hub_push(config.tracking.push_to_hub, "tracking.push_to_hub")


def card_folder(export: Path) -> Path:
    """The folder a repository mirrors for a `cogft export` folder: the one with the model card, so the Hub shows
    it and `from_pretrained(REPO)` finds the weights (an SFT export's transformer/); a merged pipeline, which has
    no card, goes whole."""
    return export / TRANSFORMER_DIR if (export / TRANSFORMER_DIR / CARD_FILE).is_file() else export


def push(folder: Path, repo_id: str, private: bool | None, retry: str) -> str:
    """Create the model repository when missing (`private` applies then only, as on the Hub) and upload `folder`
    as one commit; returns the repository's URL. `retry`: the command that pushes again, for the error."""
    from huggingface_hub import HfApi

    from .. import __version__

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                          commit_message=f"Upload {folder.name} trained with cogft {__version__}")
    except Exception as error:  # any failure of the upload (network, permission, quota) gets the same way back
        raise HubPushError(f"pushing {folder} to {repo_id} failed: {type(error).__name__}: {error}. Nothing is "
                           f"lost, the export stays in {folder}; push it again with {retry}") from error
    logger.info("pushed %s to %s", folder, url)
    return str(url)


def push_run_export(config: Config, run_dir: Path) -> str:
    """Upload a finished run's final export (lora/ or transformer/) to `tracking.push_to_hub`."""
    folder = run_dir / (LORA_DIR if config.train.mode == "lora" else TRANSFORMER_DIR)
    repo_id = config.tracking.push_to_hub
    return push(folder, repo_id, None, f"cogft export --from {run_dir} --out DIR --push-to-hub {repo_id}")
