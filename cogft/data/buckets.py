"""Frame buckets: clips shorter than `data.num_frames` train at a shorter length instead of being dropped.

Which lengths are buckets is the variant's rule (`Variant.frame_buckets`, models/spec.py). A batch must
hold one length, so the batch sampler draws each batch from one bucket. Its order is a pure function
of (seed, epoch), which is what the bit-exact resume (`set_epoch` + accelerate's `skip_first_batches`)
relies on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """A permutation of range(n) that depends only on (seed, epoch).

    Exposed as the batch sampler's `.sampler` because accelerate forwards `set_epoch` to
    `batch_sampler.sampler` when it shards batches over processes.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class BucketBatchSampler(Sampler[list[int]]):
    """Full batches of indices that share a frame count, shuffled per epoch.

    Batches fill in the order of the epoch's permutation (the grouping of torchvision's
    GroupedBatchSampler); a bucket's last, short batch is topped up with that bucket's first clips
    of the epoch, so every batch has `batch_size` items: accelerate shards whole batches over
    processes and assumes only the last one may be short, which would mix lengths.
    """

    drop_last = False

    def __init__(self, frames: Sequence[int], batch_size: int, seed: int):
        if not frames:
            raise ValueError("BucketBatchSampler needs at least one item")
        self.frames = list(frames)
        self.batch_size = batch_size
        self.sampler = EpochShuffle(len(self.frames), seed)
        self.sizes = {f: self.frames.count(f) for f in sorted(set(self.frames), reverse=True)}

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(math.ceil(n / self.batch_size) for n in self.sizes.values())

    def __iter__(self) -> Iterator[list[int]]:
        open_batches: dict[int, list[int]] = defaultdict(list)
        first_seen: dict[int, list[int]] = defaultdict(list)
        for index in self.sampler:
            frames = self.frames[index]
            if len(first_seen[frames]) < self.batch_size:
                first_seen[frames].append(index)
            batch = open_batches[frames]
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch
                open_batches[frames] = []
        for frames in self.sizes:  # largest first: a fixed order, independent of dict history
            batch = open_batches[frames]
            if batch:
                fill = first_seen[frames]
                yield batch + [fill[i % len(fill)] for i in range(self.batch_size - len(batch))]
