"""Several sets in one epoch (`data.sets`): how many samples each set gives an epoch, and which.

A set with `repeats` gives each of its samples that many times; a set with a `weight` gives its share of the epoch,
a different subset each epoch. The counts are fixed per (set, bucket) (a weighted set's share is spread over its
buckets in proportion to their sizes), so every epoch makes the same batches and `len(loader)`, from which a resume
computes its epoch and offset, never changes. Which samples a weighted set gives, and the epoch's order, are drawn
from (seed, epoch) alone: the order is a pure function of them, as with one set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ..seeding import mixed_seed
from .errors import DatasetLayoutError
from .sources import DataSet, data_sets

Group = tuple[int, Hashable]  # (set index, bucket)


def set_shares(sizes: Sequence[int], sets: Sequence[DataSet]) -> list[int]:
    """Samples each set gives an epoch: `repeats` × its size, or its weight's share (at least one sample).

    All weighted: relative shares of as many samples as the sets hold together. Beside sets with repeats: shares of
    the whole epoch, which the sets with repeats fill the rest of (the config refuses weights summing to 1 or more)."""
    weights = [s.weight for s in sets if s.weight is not None]
    counted = sum(size * s.repeats for size, s in zip(sizes, sets) if s.weight is None)
    total = sum(sizes) / sum(weights) if len(weights) == len(sets) else counted / (1 - sum(weights)) if weights else 0
    return [size * s.repeats if s.weight is None else max(1, round(s.weight * total)) for size, s in zip(sizes, sets)]


def apportion(count: int, sizes: dict[Hashable, int]) -> dict[Hashable, int]:
    """`count` spread over groups in proportion to their `sizes` (largest remainders, ties to the first group)."""
    total = sum(sizes.values())
    exact = {key: count * size / total for key, size in sizes.items()}
    shares = {key: int(value) for key, value in exact.items()}
    for key in sorted(exact, key=lambda k: shares[k] - exact[k])[:count - sum(shares.values())]:
        shares[key] += 1
    return shares


class EpochMix(Sampler[int]):
    """An epoch's draws from several sets, shuffled: a pure function of (seed, epoch).

    `sets_of`: each item's set index; `keys`: each item's bucket. Exposed as the batch sampler's `.sampler`, like
    `EpochShuffle`, so accelerate's `set_epoch` reaches it."""

    def __init__(self, sets_of: Sequence[int], keys: Sequence[Hashable], sets: Sequence[DataSet], seed: int):
        self.seed, self.epoch = seed, 0
        self.members: dict[Group, list[int]] = {}
        for index, group in enumerate(zip(sets_of, keys)):
            self.members.setdefault(group, []).append(index)
        self.groups = sorted(self.members, key=lambda g: (g[0], str(g[1])))
        sizes = Counter(sets_of)
        shares = set_shares([sizes[s.index] for s in sets], sets)
        self.draws: dict[Group, int] = {}
        for data_set, share in zip(sets, shares):
            mine = {g: len(self.members[g]) for g in self.groups if g[0] == data_set.index}
            self.draws.update(apportion(share, mine) if data_set.weight is not None else
                              {g: n * data_set.repeats for g, n in mine.items()})
        self.n = sum(self.draws.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def counts(self) -> Counter:
        """Draws an epoch makes of each bucket, over all sets (the batch plan's input)."""
        counts: Counter = Counter()
        for (_, key), n in self.draws.items():
            counts[key] += n
        return counts

    def __len__(self) -> int:
        return self.n

    def epoch_items(self) -> list[int]:
        """The epoch's draws, grouped (before the shuffle): whole passes over a group, then a drawn part of it."""
        items: list[int] = []
        for ordinal, group in enumerate(self.groups):
            members, count = self.members[group], self.draws[group]
            passes, rest = divmod(count, len(members))
            items += members * passes
            if rest:
                generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch, ordinal))
                items += [members[i] for i in torch.randperm(len(members), generator=generator)[:rest].tolist()]
        return items

    def __iter__(self) -> Iterator[int]:
        items = self.epoch_items()
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter([items[i] for i in torch.randperm(len(items), generator=generator).tolist()])


def epoch_mix(sets_of: Sequence[int], keys: Sequence[Hashable], data, seed: int) -> EpochMix | None:
    """The mix of `data.sets` over the training entries (None: `data.path` alone, each sample once an epoch); a set
    left with no sample to train on (every clip skipped or held out) is refused by key."""
    if not data.sets:
        return None
    sets = data_sets(data)
    for data_set in sets:
        if data_set.index not in set(sets_of):
            raise DatasetLayoutError(f"{data_set.key}: no clip of {data_set.data.path} is left to train on (every one "
                                     "was skipped, or held out by eval.holdout); prepare_report.jsonl in the run "
                                     "directory says why for each, or remove the set")
    return EpochMix(sets_of, keys, sets, seed)
