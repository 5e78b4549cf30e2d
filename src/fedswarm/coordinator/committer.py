"""The round engine's background worker: a round's evaluation and commit run here while the next round trains.

At most one job is in flight: `submit` first waits for the previous one, so a commit never falls more than one
round behind the round being trained, and a failed job (its exception) reaches the engine at the next
`submit`, `wait` or `close`, never lost in a thread."""
from __future__ import annotations

import threading
from collections.abc import Callable


class Committer:
    """One worker thread, a queue of one."""

    def __init__(self, name: str = "round-committer"):
        self._name = name
        self._lock = threading.Lock()   # `idle` may be called from several cohort threads at once
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` in the background once the job in flight (if any) has finished; re-raises its error."""
        self.wait()
        with self._lock:
            self._thread = threading.Thread(target=self._run, args=(job,), name=self._name, daemon=True)
            self._thread.start()

    def idle(self) -> None:
        """Until the job in flight has finished; any thread may call it. Its error is kept for `wait`."""
        with self._lock:
            if self._thread is not None:
                self._thread.join()

    def wait(self) -> None:
        """Until the job in flight has finished; re-raises its error (once)."""
        self.idle()
        with self._lock:
            self._thread = None
            error, self._error = self._error, None
        if error is not None:
            raise error

    close = wait   # the run ends (or stops): what was handed off still lands

    @property
    def in_flight(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as err:  # noqa: BLE001 - handed to the engine at its next submit, wait or close
            self._error = err
