"""Each trained sample's loss, timestep and clip, recorded as training goes (RUN/clip_losses/, `clip_records`).

The losses are those the step already computed (`TrainingStep.sample_losses`: the family's per-sample objective,
whose mean is the step's loss): no extra forward. They stay on the device through the step, are copied to the host
asynchronously when it ends and written one step later, as the step's scalars are (`readout.py`), so no step waits
for the GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..data.cache import CacheEntry
from ..data.dataset import PRIOR
from .clip_records import append, rank_file, row, write_clips
from .evaluation import clip_key

logger = logging.getLogger(__name__)


def entry_id(entry: CacheEntry) -> str:
    """A trained entry's id in the records: its clip's content key, caption and set (the same bytes listed with two
    captions are two entries), so an id means the same sample in every resume."""
    return hashlib.sha256(json.dumps([clip_key(entry), entry.caption, entry.set]).encode()).hexdigest()[:12]


class ClipLossRecorder:
    """Per micro-batch `add`, per optimizer step `launch` (the copy to the host starts), and `write` (the rows of
    the steps launched up to a step, on this rank's file) once the step after it runs."""

    def __init__(self, run_dir: Path, entries: list[CacheEntry], schedule: int, rank: int, main: bool,
                 enabled: bool) -> None:
        self.enabled = enabled
        self.path = rank_file(run_dir, rank)
        self.ids = [entry_id(e) for e in entries]
        self._parts: list[torch.Tensor] = []
        self._pending: list[tuple[int, torch.Tensor, torch.Event | None]] = []
        if main and not enabled:
            logger.info("per-clip losses not recorded: the model family gives its loss per batch only")
        if main and enabled:
            write_clips(run_dir, schedule, {i: {"video": e.video, "caption": e.caption, "listed_at": e.line,
                                                "set": e.set} for i, e in zip(self.ids, entries) if not e.prior})

    def add(self, batch: dict, sample_losses: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """One micro-batch's (timesteps, losses) beside its dataset indices, on the device; a prior set's batch (its
        loss measures the distance to the base model, not the clip's fit) is not recorded."""
        if not self.enabled or sample_losses is None or batch.get(PRIOR):
            return
        timesteps, losses = sample_losses
        index = batch["index"].to(losses.device, non_blocking=True)
        self._parts.append(torch.stack([index.double(), timesteps.double(), losses.double()], dim=1))

    def launch(self, step: int) -> None:
        """The step's samples start their copy to the host."""
        if not self._parts:
            return
        rows = torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0]
        self._parts = []
        if rows.device.type == "cpu":
            self._pending.append((step, rows, None))
            return
        host = rows.to("cpu", non_blocking=True)
        event = torch.Event(rows.device.type)
        event.record()
        self._pending.append((step, host, event))

    def write(self, step: int) -> None:
        """The rows of the steps launched up to `step` (their copies have landed by the time the next step runs)."""
        text = []
        while self._pending and self._pending[0][0] <= step:
            launched, host, event = self._pending.pop(0)
            if event is not None:
                event.synchronize()
            text.append(row(launched, [(self.ids[int(i)], t, loss) for i, t, loss in host.tolist()]))
        if any(text):
            append(self.path, "".join(text))
