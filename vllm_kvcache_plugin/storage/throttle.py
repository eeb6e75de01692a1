"""At most one warning per interval from a tier that keeps failing the same way (a full disk, a
store that stays busy): the others go to debug, and the next warning says how many there were."""

from __future__ import annotations

import logging
import threading
import time


class WarningThrottle:
    def __init__(self, logger: logging.Logger, interval_secs: float) -> None:
        self.logger = logger
        self.interval = interval_secs
        self._lock = threading.Lock()  # tiers warn from the forward, lookup, writer and loop threads
        self._last = -interval_secs
        self._quiet = 0

    def warn(self, msg: str, *args: object, enabled: bool = True) -> None:
        """Warn unless one was logged less than an interval ago; ``enabled=False`` (a state that
        was warned about already, e.g. a store marked down) logs at debug and starts no interval."""
        now = time.monotonic()
        with self._lock:
            due = enabled and now - self._last >= self.interval
            if due:
                self._last, quiet, self._quiet = now, self._quiet, 0
            elif enabled:
                self._quiet += 1
        if not due:
            self.logger.debug(msg, *args)
            return
        if quiet:
            msg += f" ({quiet} more like this since the last warning)"
        self.logger.warning(msg, *args)
