"""Buckets: clips train at the frame count they fill and the size nearest their shape, instead of being dropped
or distorted.

A bucket is (frames, height, width). Which lengths are frame buckets is the variant's rule
(`Variant.frame_buckets`, models/spec.py), which sizes are resolution buckets the config's (`data.buckets`),
and still images are one-frame samples. A batch must hold one shape, so the batch sampler draws each batch
from one bucket, and every sample once per epoch (a bucket's remainder is a short batch). Its order is a pure
function of (seed, epoch), which is what the bit-exact resume (`set_epoch` + accelerate's `skip_first_batches`)
relies on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler

from .errors import DatasetLayoutError


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
    """Batches of indices that share a bucket, shuffled per epoch: every item exactly once per epoch.

    Batches fill in the order of the epoch's permutation (the grouping of torchvision's GroupedBatchSampler).
    A bucket whose items do not divide into its batch size ends in a short batch (never topped up with copies:
    a clip alone in its bucket would train `batch_size` times an epoch). With several processes, accelerate
    deals whole batches round-robin and repeats the first ones to give every process a batch at the last step,
    so the plan halves its largest batches until their count is a multiple of `processes`; where the items are
    too few for that the sampler refuses (`batch_plan`). Which batches are short depends only on the bucket counts,
    their order only on (seed, epoch): every rank computes the same batches, and a resume skips to the same place.
    `batch_sizes` gives some buckets their own size (still images: `data.image_batch_size`).
    """

    drop_last = False

    def __init__(self, buckets: Sequence[Hashable], batch_size: int, seed: int,
                 batch_sizes: Mapping[Hashable, int] | None = None, processes: int = 1,
                 mix: Sampler[int] | None = None):
        """`mix`: the epoch's draws from several sets (`mixing.EpochMix`: repeats, weights) instead of each item
        once."""
        if not buckets:
            raise ValueError("BucketBatchSampler needs at least one item")
        self.buckets = list(buckets)
        self.sampler = mix if mix is not None else EpochShuffle(len(self.buckets), seed)
        drawn = mix.counts() if mix is not None else {b: self.buckets.count(b) for b in set(self.buckets)}
        self.counts = {b: drawn[b] for b in sorted(drawn, reverse=True)}
        self.size_of = {b: (batch_sizes or {}).get(b, batch_size) for b in self.counts}
        self.plan = batch_plan(self.counts, self.size_of, processes)
        # accelerate's sharding reads `batch_size`; None tells it batches differ in length (each is still whole)
        lengths = {length for plan in self.plan.values() for length in plan}
        self.batch_size = lengths.pop() if len(lengths) == 1 else None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(len(plan) for plan in self.plan.values())

    def __iter__(self) -> Iterator[list[int]]:
        open_batches: dict[Hashable, list[int]] = defaultdict(list)
        done: dict[Hashable, int] = defaultdict(int)  # batches of the bucket yielded so far
        for index in self.sampler:
            bucket = self.buckets[index]
            batch = open_batches[bucket]
            batch.append(index)
            if len(batch) == self.plan[bucket][done[bucket]]:
                yield batch
                open_batches[bucket] = []
                done[bucket] += 1

    def describe(self) -> dict[str, str]:
        """Per bucket, its items and the batches an epoch makes of them, e.g. {"9x64x96": "5 in batches of 2, 2, 1"}."""
        return {bucket_name(b) if isinstance(b, tuple) else str(b): f"{self.counts[b]} in batches of "
                f"{', '.join(map(str, self.plan[b]))}" for b in self.counts}

    def short_batches(self) -> int:
        return sum(length < self.size_of[b] for b, plan in self.plan.items() for length in plan)


def batch_plan(counts: Mapping[Hashable, int], size_of: Mapping[Hashable, int],
               processes: int = 1) -> dict[Hashable, list[int]]:
    """The length of each batch an epoch makes of each bucket, longest first: full batches, then the remainder.

    With several processes every step needs one batch per process, so the count of batches must be a multiple
    of `processes` (accelerate would otherwise repeat items to fill the last step): the longest batches are halved
    until it is. Too few items for that is an error that says so, never a silent repeat.
    """
    plan = {b: [size_of[b]] * (n // size_of[b]) + ([n % size_of[b]] if n % size_of[b] else [])
            for b, n in counts.items()}
    missing = -sum(map(len, plan.values())) % processes
    for _ in range(missing):
        bucket = max(plan, key=lambda b: (plan[b][0], -list(plan).index(b)))  # the first bucket's of equals
        longest = plan[bucket].pop(0)
        if longest < 2:
            items = sum(counts.values())
            raise DatasetLayoutError(f"{items} samples cannot give each of {processes} processes a batch of its own at "
                                     "every step without repeating samples; train on fewer processes, or add samples")
        plan[bucket] = sorted([*plan[bucket], longest // 2, longest - longest // 2], reverse=True)
    return plan


def bucket_name(bucket: tuple) -> str:
    """"49x480x720" (frames x height x width), as reports and trackers count buckets ("49x480x720xprior": a prior
    set's)."""
    return "x".join(map(str, bucket))


def still_batch_sizes(buckets: Sequence[tuple[int, int, int]], image_batch_size: int | None) -> dict:
    """The batch size of every one-frame (still image) bucket, where `data.image_batch_size` sets one."""
    if image_batch_size is None:
        return {}
    return {bucket: image_batch_size for bucket in set(buckets) if bucket[0] == 1}
