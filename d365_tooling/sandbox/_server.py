"""Run the sandbox with uvicorn in a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType

import uvicorn

from ._app import SandboxApp, create_app
from ._config import SandboxConfig
from ._seed import SeedManifest
from ._state import SandboxState


class SandboxServer:
    """`with SandboxServer(state, config) as srv: httpx.get(srv.url + "/v1/customers")` (also `async with`)."""

    def __init__(
        self, state: SandboxState | None = None, config: SandboxConfig | None = None, *, port: int = 0,
        host: str = "127.0.0.1", log_level: str = "warning",
    ) -> None:
        self.state = state if state is not None else SandboxState()
        self.config = config if config is not None else SandboxConfig()
        self.app: SandboxApp = create_app(self.state, self.config)
        self.host = host
        self._requested_port = port
        self.port = 0
        self._log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def manifest(self) -> SeedManifest | None:
        """The SeedManifest of the last `seed_world()` on this server's state, if any."""
        m = self.state.manifest
        return m if isinstance(m, SeedManifest) else None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("SandboxServer is not running")
        return f"http://{self.host}:{self.port}"

    def start(self) -> SandboxServer:
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        sock.listen(128)
        self._sock = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level=self._log_level, lifespan="off", access_log=False, timeout_keep_alive=30,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        self._server = server

        def run() -> None:
            asyncio.run(server.serve(sockets=[sock]))

        self._thread = threading.Thread(target=run, name=f"sandbox-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError("sandbox server failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError("sandbox server did not start within 10 s")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._server = None
        self._thread = None
        self._sock = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> SandboxServer:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)
