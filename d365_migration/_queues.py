"""Sending messages to the chain's Storage queues, Base64-encoded as the Functions queue trigger expects.

Next-step messages normally leave through the functions' output bindings (written only when a step returns). This
sender is for what bindings cannot do: a *delayed* message (``visibility_timeout``), used to wait for provisioning
without holding a worker, and for the CLI's ``retry``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from azure.core.exceptions import AzureError, ResourceExistsError
from azure.storage.queue import QueueClient, QueueServiceClient, TextBase64DecodePolicy, TextBase64EncodePolicy

from ._exceptions import LedgerError

__all__ = [
    "QueueSender",
]


class QueueSender:
    def __init__(self, service: QueueServiceClient) -> None:
        self._service = service
        self._clients: dict[str, QueueClient] = {}
        self._created: set[str] = set()

    @classmethod
    def from_connection_string(cls, connection_string: str) -> QueueSender:
        return cls(QueueServiceClient.from_connection_string(connection_string))

    @classmethod
    def from_endpoint(cls, queue_uri: str, credential: Any) -> QueueSender:
        return cls(QueueServiceClient(account_url=queue_uri, credential=credential))

    def _client(self, queue: str) -> QueueClient:
        client = self._clients.get(queue)
        if client is None:
            client = self._service.get_queue_client(queue, message_encode_policy=TextBase64EncodePolicy(),
                                                    message_decode_policy=TextBase64DecodePolicy())
            self._clients[queue] = client
        return client

    def _send(self, queue: str, body: str, visibility_timeout: int | None) -> None:
        client = self._client(queue)
        if queue not in self._created:
            with contextlib.suppress(ResourceExistsError):
                client.create_queue()
            self._created.add(queue)
        client.send_message(body, visibility_timeout=visibility_timeout)

    async def send(self, queue: str, body: str, *, delay_seconds: int = 0) -> None:
        try:
            await asyncio.to_thread(self._send, queue, body, max(0, min(delay_seconds, 7 * 24 * 3600)) or None)
        except AzureError as exc:
            raise LedgerError(f"could not write to queue {queue}: {type(exc).__name__}") from None

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._service.close()
