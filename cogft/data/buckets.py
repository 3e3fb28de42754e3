"""Buckets: clips train at the frame count they fill and the size nearest their shape, instead of being dropped
or distorted.

A bucket is (frames, height, width). Which lengths are frame buckets is the variant's rule
(`Variant.frame_buckets`, models/spec.py), which sizes are resolution buckets the config's (`data.buckets`),
and still images are one-frame samples. A batch must hold one shape, so the batch sampler draws each batch
from one bucket. Its order is a pure function of (seed, epoch), which is what the bit-exact resume
(`set_epoch` + accelerate's `skip_first_batches`) relies on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterator, Mapping, Sequence

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
    """Full batches of indices that share a bucket, shuffled per epoch.

    Batches fill in the order of the epoch's permutation (the grouping of torchvision's
    GroupedBatchSampler); a bucket's last, short batch is topped up with that bucket's first items
    of the epoch, so every batch of a bucket has its batch size: accelerate shards whole batches over
    processes and assumes only the last one may be short, which would mix shapes. `batch_sizes` gives
    some buckets their own size (still images: `data.image_batch_size`).
    """

    drop_last = False

    def __init__(self, buckets: Sequence[Hashable], batch_size: int, seed: int,
                 batch_sizes: Mapping[Hashable, int] | None = None):
        if not buckets:
            raise ValueError("BucketBatchSampler needs at least one item")
        self.buckets = list(buckets)
        self.sampler = EpochShuffle(len(self.buckets), seed)
        self.counts = {b: self.buckets.count(b) for b in sorted(set(self.buckets), reverse=True)}
        self.size_of = {b: (batch_sizes or {}).get(b, batch_size) for b in self.counts}
        # accelerate's sharding reads `batch_size`; None tells it batches differ in length (all are still complete)
        sizes = set(self.size_of.values())
        self.batch_size = sizes.pop() if len(sizes) == 1 else None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(math.ceil(n / self.size_of[b]) for b, n in self.counts.items())

    def __iter__(self) -> Iterator[list[int]]:
        open_batches: dict[Hashable, list[int]] = defaultdict(list)
        first_seen: dict[Hashable, list[int]] = defaultdict(list)
        for index in self.sampler:
            bucket = self.buckets[index]
            size = self.size_of[bucket]
            if len(first_seen[bucket]) < size:
                first_seen[bucket].append(index)
            batch = open_batches[bucket]
            batch.append(index)
            if len(batch) == size:
                yield batch
                open_batches[bucket] = []
        for bucket in self.counts:  # largest first: a fixed order, independent of dict history
            batch = open_batches[bucket]
            if batch:
                fill = first_seen[bucket]
                yield batch + [fill[i % len(fill)] for i in range(self.size_of[bucket] - len(batch))]


def bucket_name(bucket: tuple[int, int, int]) -> str:
    """"49x480x720" (frames x height x width), as reports and trackers count buckets."""
    return "x".join(map(str, bucket))


def still_batch_sizes(buckets: Sequence[tuple[int, int, int]], image_batch_size: int | None) -> dict:
    """The batch size of every one-frame (still image) bucket, where `data.image_batch_size` sets one."""
    if image_batch_size is None:
        return {}
    return {bucket: image_batch_size for bucket in set(buckets) if bucket[0] == 1}
