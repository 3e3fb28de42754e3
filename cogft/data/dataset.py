"""The training dataset: cached latent distributions and prompt embeddings, nothing else."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from .cache import CacheEntry


class LatentDataset(Dataset):
    """Reads one cache entry per item from disk, so memory does not grow with the dataset."""

    def __init__(self, entries: list[CacheEntry]):
        if not entries:
            raise ValueError("the dataset is empty: every clip was skipped (see prepare_report.jsonl in the run dir)")
        self.entries = entries
        self.frames = [e.frames for e in entries]  # the frame bucket of each item, for BucketBatchSampler

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.entries[index]
        latents = load_file(entry.latents)
        return {
            "latent_mean": latents["latent_mean"],
            "latent_logvar": latents["latent_logvar"],
            "prompt_embeds": load_file(entry.prompt)["prompt_embeds"],
            "index": torch.tensor(index),
        }


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
