"""The janitor: a thread that expires abandoned uploads every ``ServerLimits.janitor_interval_s``.

It runs between the server's start (which expires once itself, in ``OffsiteService.recover``) and its
stop, which ends it before the server drains: it never runs while the state is being closed.
"""

from __future__ import annotations

import logging
import threading

from offsite.server.service import OffsiteService

log = logging.getLogger("offsite.server")


class Janitor:
    def __init__(self, service: OffsiteService):
        self._service = service
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offsite-janitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self._service.limits.janitor_interval_s):
            try:
                self._service.expire_abandoned()
            except Exception:  # a busy database or a full disk must not end the janitor
                log.exception("could not expire abandoned uploads")
