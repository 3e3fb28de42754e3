"""A step's scalars (loss, gradient norm, finite flag, loss scale) on their way to the host.

Reading them with `.item()` right after the update makes the CPU wait for the GPU, and the GPU then
idles while the CPU launches the next step. They are copied asynchronously instead and read one step
later, when the copy has landed and the GPU is already busy with the next step.
"""

from __future__ import annotations

import torch


class StepReadout:
    """Named scalars, each a tensor on any device or a plain number; `values()` gives them as floats."""

    def __init__(self, **scalars: torch.Tensor | float | bool) -> None:
        self._ready = {name: float(v) for name, v in scalars.items()
                       if not isinstance(v, torch.Tensor) or v.device.type == "cpu"}
        on_device = {name: v for name, v in scalars.items() if name not in self._ready}
        self._names = list(on_device)
        self._host, self._event = None, None
        if on_device:
            stacked = torch.stack([v.detach().reshape(()).float() for v in on_device.values()])
            self._host = stacked.to("cpu", non_blocking=True)  # lands in pinned memory
            self._event = torch.Event(stacked.device.type)
            self._event.record()

    def values(self) -> dict[str, float]:
        """The scalars as floats; waits only for the step that made them, not for work queued after it."""
        if self._event is not None:
            self._event.synchronize()
            self._ready.update(zip(self._names, self._host.tolist()))
            self._event = None
        return dict(self._ready)
