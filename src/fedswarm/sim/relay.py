"""A loopback TCP relay that counts the bytes crossing it: upload bytes measured at the socket."""
from __future__ import annotations

import asyncio
import threading


class CountingRelay:
    """Listens on 127.0.0.1:0 and forwards every connection to `target` ("host:port")."""

    def __init__(self, target: str):
        self.target_host, _, port = target.rpartition(":")
        self.target_port = int(port)
        self.bytes_up = 0      # client -> coordinator
        self.bytes_down = 0    # coordinator -> client
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self.address = ""

    def __enter__(self) -> "CountingRelay":
        self._thread.start()
        self._ready.wait(10)
        if not self.address:
            raise RuntimeError("the counting relay did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.bytes_up, self.bytes_down

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False))

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
        try:
            while data := await src.read(1 << 16):
                with self._lock:
                    if upstream:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()
