"""Where a process sits among the others: what seeds its noise, which samples it sees and which share of the
evaluation and validation work it takes.

Today every process is its own data-parallel rank. A context-parallel group (one sample's sequence split over
several GPUs) would share one data rank: its members see the same samples and must draw the same noise, so the
seeds and shards below are keyed by the data rank, never by the raw process index.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    data_rank: int = 0           # which data-parallel shard this process trains on
    data_parallel_size: int = 1  # how many shards the global batch is split into
    context_rank: int = 0        # this process's place inside its context-parallel group
    context_parallel_size: int = 1

    @classmethod
    def of(cls, accelerator) -> Topology:
        """Every process a data-parallel rank of its own (no context parallelism yet)."""
        return cls(data_rank=accelerator.process_index, data_parallel_size=accelerator.num_processes)

    def first_sample(self, samples_per_rank: int) -> int:
        """The global index of this rank's first sample in a batch: what keys its samples' noise generators, so a
        sample draws the same noise however the batch is split over the ranks."""
        return self.data_rank * samples_per_rank

    def share(self, count: int, shared_forward: bool = False) -> range:
        """The items (validation prompts, held-out clips) this rank works on: every `data_parallel_size`-th, or all of
        them where the weights are sharded and every process takes part in every forward (`shared_forward`)."""
        return range(count) if shared_forward else range(self.data_rank, count, self.data_parallel_size)
