"""The training dataset: what prepare cached per clip (the variant's latent entry) and the prompt embedding."""

from __future__ import annotations

import random

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from ..models.family import LOSS_MASK
from ..seeding import mixed_seed
from .cache import CacheEntry
from .sources import DatasetLayoutError


class LatentDataset(Dataset):
    """Reads one cache entry per item from disk, so memory does not grow with the dataset.

    A clip cached as several windows (`data.windows`) trains on one of them per epoch, drawn from
    (seed, epoch, item): a resumed run draws the same windows as an uninterrupted one.
    """

    def __init__(self, entries: list[CacheEntry], seed: int = 0):
        if not entries:
            raise DatasetLayoutError("the dataset is empty: every clip was skipped; prepare_report.jsonl in the run "
                                     "directory says why for each (or run cogft doctor on the config)")
        self.entries = entries
        # (frames, height, width) of each item, for BucketBatchSampler; a prior set's apart (a batch holds one kind)
        self.buckets = [(*e.bucket, "prior") if e.prior else e.bucket for e in entries]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating an epoch (DataLoader workers copy the dataset when iteration starts)."""
        self.epoch = epoch

    def window(self, index: int) -> int:
        windows = len(self.entries[index].latents)
        if windows == 1:
            return 0
        return random.Random(mixed_seed(self.seed, self.epoch, index)).randrange(windows)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.entries[index]
        item = {
            **load_file(entry.latents[self.window(index)]),  # what the variant's spec caches per clip
            "prompt_embeds": load_file(entry.prompt)["prompt_embeds"],
            "index": torch.tensor(index),
        }
        if entry.prior:  # a host-side flag (no device sync to read it): the step trains it towards the base model
            item[PRIOR] = True
        return item


PRIOR = "prior"  # the batch key of a `kind: prior` set's batch


def collate(items: list[dict]) -> dict:
    """The items' tensors stacked; a flag (PRIOR) as it is, the same for every item of a batch. Where some items carry
    a loss mask and others none, those get ones (every element counts alike: the loss they would have without one);
    the items of a batch share a bucket, so their masks share a shape."""
    masks = [item[LOSS_MASK] for item in items if LOSS_MASK in item]
    if masks and len(masks) < len(items):
        items = [item if LOSS_MASK in item else {**item, LOSS_MASK: torch.ones_like(masks[0])} for item in items]
    return {key: torch.stack([item[key] for item in items]) if isinstance(items[0][key], torch.Tensor)
            else items[0][key] for key in items[0]}
