"""Frame buckets: the list, the batch sampler (alone and under accelerate), and a run that trains on two buckets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler

from cogft.data.buckets import BucketBatchSampler
from cogft.models.cogvideox.spec import frame_buckets

REPO = Path(__file__).resolve().parent.parent
FRAMES = [9] * 5 + [5] * 3 + [1]


@pytest.mark.parametrize("num,minimum,expected", [
    (49, 17, (49, 41, 33, 25, 17)), (9, 5, (9, 5)), (9, 9, (9,)), (13, 9, (13, 9)), (49, 45, (49, 45)),
])
def test_frame_buckets(num, minimum, expected):
    assert frame_buckets(num, minimum) == expected


def test_batches_hold_one_length_and_every_sample_once():
    """5 + 3 + 1 items in batches of 2: each bucket's remainder is a short batch, nothing is repeated."""
    sampler = BucketBatchSampler(FRAMES, batch_size=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 1
    assert all(len({FRAMES[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(FRAMES)))
    assert sorted(len(b) for b in batches) == [1, 1, 1, 2, 2, 2] and sampler.batch_size is None
    assert sampler.describe() == {"9": "5 in batches of 2, 2, 1", "5": "3 in batches of 2, 1", "1": "1 in batches of 1"}


def test_order_is_a_function_of_seed_and_epoch():
    a, b = BucketBatchSampler(FRAMES, 2, seed=3), BucketBatchSampler(FRAMES, 2, seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    assert list(BucketBatchSampler(FRAMES, 2, seed=4)) != list(BucketBatchSampler(FRAMES, 2, seed=3))


def test_accelerate_skips_and_shards_whole_batches():
    sampler = BucketBatchSampler(FRAMES, 2, seed=0)
    sampler.set_epoch(2)
    assert list(SkipBatchSampler(sampler, 2)) == list(sampler)[2:]
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert all(len({FRAMES[i] for i in b}) == 1 for shard in shards for b in shard)
    assert sorted(i for shard in shards for b in shard for i in b) == list(range(len(FRAMES)))


def test_rotary_run_trains_on_two_buckets(make_config, hostile_clips, tmp_path):
    """Two full clips and two 6-frame clips: batches of 9 and of 5 frames, RoPE per latent length."""
    from cogft.training.loop import train

    data = tmp_path / "mixed"
    data.mkdir()
    for name, caption in (("bouncing_square", "a red square"), ("fractal_zoom", "a fractal")):
        shutil.copy(REPO / "data" / "videos" / f"{name}.mp4", data / f"{name}.mp4")
        (data / f"{name}.txt").write_text(caption)
    for name in ("short_a", "short_b"):  # same bytes, different captions: both kept
        shutil.copy(hostile_clips / "short.mp4", data / f"{name}.mp4")
        (data / f"{name}.txt").write_text(f"a short clip {name}")
    run = train(make_config(f"data.path={data}", "model.path=tiny://5b", "data.min_frames=5", "train.max_steps=4",
                            "train.batch_size=2", "validation.prompts=[]", "train.checkpoint_every=100"))
    report = [json.loads(line) for line in (run / "prepare_report.jsonl").read_text().splitlines()]
    assert report[-1]["summary"]["buckets"] == {"9": 2, "5": 2}
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 4 and all(loss == loss and abs(loss) < 1e6 for loss in losses)


def test_accelerate_reads_the_batch_size_batches_really_have():
    """Images only, 3 to a batch while train.batch_size is 2: sharding must see complete batches of 3, or it takes
    every batch for a short last one."""
    from cogft.data.buckets import still_batch_sizes

    buckets = [(1, 64, 96)] * 6
    sampler = BucketBatchSampler(buckets, 2, seed=0, batch_sizes=still_batch_sizes(buckets, 3))
    assert sampler.batch_size == 3
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=r)) for r in (0, 1)]
    assert [len(shard) for shard in shards] == [1, 1] and all(len(b) == 3 for shard in shards for b in shard)
    mixed = BucketBatchSampler([(9, 64, 96)] * 2 + buckets, 2, seed=0, batch_sizes=still_batch_sizes(buckets, 3))
    assert mixed.batch_size is None  # batches of 2 and of 3: accelerate takes each as complete
