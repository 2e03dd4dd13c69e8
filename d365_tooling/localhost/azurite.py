"""Start and stop a private Azurite (the Azure Storage emulator) for tests, the local runner and the demo.

Azurite comes from ``node_modules`` (``npm ci`` installs the version pinned in ``package.json``). Each
:class:`AzuriteProcess` listens on loopback only, on free ports, keeps everything in memory, and is terminated
(with any child processes) when the ``with`` block ends::

    with AzuriteProcess() as azurite:
        QueueServiceClient.from_connection_string(azurite.connection_string)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableServiceClient
from azure.storage.queue import QueueServiceClient

__all__ = [
    "DEV_ACCOUNT_KEY",
    "DEV_ACCOUNT_NAME",
    "AzuriteError",
    "AzuriteProcess",
    "find_repo_root",
    "free_port",
    "wipe_account",
]

log = logging.getLogger("d365_tooling.localhost")

#: The well-known Azurite development account. Public (documented by Microsoft), not a secret.
DEV_ACCOUNT_NAME = "devstoreaccount1"
DEV_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_HOST = "127.0.0.1"


class AzuriteError(RuntimeError):
    """Azurite is missing, or did not start in time."""


def find_repo_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: this file) that contains ``package.json``."""
    here = (start or Path(__file__)).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "package.json").is_file():
            return candidate
    raise AzuriteError(f"no package.json found above {here}; cannot locate node_modules/.bin/azurite")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def connection_string(blob_port: int, queue_port: int, table_port: int) -> str:
    """The full devstoreaccount1 connection string for Azurite on 127.0.0.1 and the given ports."""
    return (
        "DefaultEndpointsProtocol=http;"
        f"AccountName={DEV_ACCOUNT_NAME};"
        f"AccountKey={DEV_ACCOUNT_KEY};"
        f"BlobEndpoint=http://{_HOST}:{blob_port}/{DEV_ACCOUNT_NAME};"
        f"QueueEndpoint=http://{_HOST}:{queue_port}/{DEV_ACCOUNT_NAME};"
        f"TableEndpoint=http://{_HOST}:{table_port}/{DEV_ACCOUNT_NAME};"
    )


class AzuriteProcess:
    """Azurite (blob, queue, table) on 127.0.0.1 with free ports and in-memory persistence.

    A synchronous context manager: ``__enter__`` starts Azurite and waits until all three ports accept
    connections (raising :class:`AzuriteError` with Azurite's stderr if it does not within ``startup_timeout``);
    ``__exit__`` terminates it and its children.
    """

    def __init__(self, *, repo_root: Path | None = None, startup_timeout: float = 30.0) -> None:
        self.repo_root = repo_root or find_repo_root()
        self.startup_timeout = startup_timeout
        self.blob_port = 0
        self.queue_port = 0
        self.table_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._stderr_path: Path | None = None

    @property
    def executable(self) -> Path:
        return self.repo_root / "node_modules" / ".bin" / "azurite"

    @property
    def connection_string(self) -> str:
        if self._proc is None:
            raise AzuriteError("Azurite is not running; use AzuriteProcess as a context manager")
        return connection_string(self.blob_port, self.queue_port, self.table_port)

    def command(self) -> list[str]:
        return [
            str(self.executable),
            "--blobHost", _HOST, "--queueHost", _HOST, "--tableHost", _HOST,
            "--blobPort", str(self.blob_port),
            "--queuePort", str(self.queue_port),
            "--tablePort", str(self.table_port),
            "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry", "--silent", "--loose",
        ]  # fmt: skip

    def start(self) -> AzuriteProcess:
        if self._proc is not None:
            return self
        if not self.executable.exists():
            raise AzuriteError(
                f"Azurite not found at {self.executable}; run `npm ci` in {self.repo_root} to install it"
            )
        if shutil.which("node") is None:
            raise AzuriteError("Azurite needs Node.js, and `node` is not on PATH")
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        self.blob_port, self.queue_port, self.table_port = sorted(ports)
        self._workdir = tempfile.mkdtemp(prefix="azurite-")
        self._stderr_path = Path(self._workdir) / "stderr.log"
        with open(self._stderr_path, "wb") as stderr:
            self._proc = subprocess.Popen(  # noqa: S603 - our own azurite, fixed arguments
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self._workdir,
                start_new_session=True,  # its own process group, so stop() can end children too
            )
        deadline = time.monotonic() + self.startup_timeout
        pending = [self.blob_port, self.queue_port, self.table_port]
        while pending:
            code = self._proc.poll()
            if code is not None:
                err = self._stderr()
                self.stop()
                raise AzuriteError(f"Azurite exited with code {code} during start-up; stderr: {err}")
            if time.monotonic() > deadline:
                err = self._stderr()
                self.stop()
                raise AzuriteError(
                    f"Azurite did not open ports {pending} within {self.startup_timeout:.0f}s; stderr: {err}"
                )
            pending = [p for p in pending if not _port_open(p)]
            if pending:
                time.sleep(0.05)
        log.debug("Azurite started: blob %d queue %d table %d", self.blob_port, self.queue_port, self.table_port)
        return self

    def _stderr(self) -> str:
        if self._stderr_path is None or not self._stderr_path.exists():
            return "(none)"
        text = self._stderr_path.read_text(errors="replace").strip()
        return text[-4000:] or "(empty)"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
            else:  # the leader is gone; make sure no child of its group survives
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> AzuriteProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

def wipe_account(connection_string: str) -> None:
    """Delete every queue and table in the account."""
    with QueueServiceClient.from_connection_string(connection_string) as queues:
        for queue in list(queues.list_queues()):
            with contextlib.suppress(ResourceNotFoundError):
                queues.delete_queue(queue.name)
    with TableServiceClient.from_connection_string(connection_string) as tables:
        for table in list(tables.list_tables()):
            with contextlib.suppress(ResourceNotFoundError):
                tables.delete_table(table.name)
