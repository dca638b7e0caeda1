"""A websocket server on its own asyncio loop and thread, shared by the policy server
(`embodied.serve`) and the simulated arm (`robots.sim_server`).

`start()` serves on a background thread and returns once the server listens (tests, benchmarks);
`serve_forever()` serves on the calling thread (the CLIs); `stop()` may be called from any thread.
A subclass implements `_serve()`: open the server, call `self._ready.set()` once it listens, then
`await self._stop.wait()`. `_setup()` runs first on the server's thread (a simulator's GL context
must stay on the thread that made it).
"""
from __future__ import annotations

import asyncio
import threading


class ServerThread:
    description = "the server"  # for error messages
    thread_name = "server"

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def address(self) -> str:
        raise NotImplementedError

    def _setup(self) -> None:
        """Runs on the server's thread before its event loop starts."""

    async def _serve(self) -> None:
        raise NotImplementedError

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        await self._serve()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._setup()
            self._loop.run_until_complete(self._main())
        except BaseException as err:  # reported by start() / serve_forever()
            self._error = err
            self._ready.set()
        finally:
            self._loop.close()

    def start(self, timeout: float = 30.0):
        self._thread = threading.Thread(target=self._run, daemon=True, name=self.thread_name)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.description} did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"{self.description} failed to start on {self.address}: {self._error}") from self._error
        return self

    def stop(self) -> bool:
        """Ask the server to stop and wait (10 s) for its thread; whether it has stopped."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop closed in between
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
            return not self._thread.is_alive()
        return True

    def serve_forever(self) -> None:
        self._run()
        if self._error is not None and not isinstance(self._error, KeyboardInterrupt):
            raise self._error
