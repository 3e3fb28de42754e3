"""A graceful stop: SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the next step boundary."""

from __future__ import annotations

import contextlib
import logging
import signal

logger = logging.getLogger(__name__)


class StopRequest:
    """Installs the handlers for the duration of a `with` block; a second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        logger.warning("signal %d: writing a checkpoint, then stopping (send again to stop at once)", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
