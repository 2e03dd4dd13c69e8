"""An async Partner Center REST client on httpx.

``PartnerCenterClient(endpoint, credential, *, ...)`` follows the Azure SDK shape: keyword-only options, paging hidden
behind async iterators, typed errors carrying Partner Center's ``code`` and ``description``.

Retries: 429 waits ``Retry-After`` (and slows the shared limiter); a ``Retry-After`` longer than ``max_retry_after``
raises :class:`RetryAfterTooLongError` (look again later, not a failure). 5xx, 408 and transport errors are retried
with exponential backoff and jitter, always with the *same* ``MS-RequestId``. A write that may have been applied
without us seeing the answer (``idempotent=False``) is not retried blindly: it raises :class:`ResponseLostError` or
:class:`UncertainWriteError` (``maybe_applied``) and the caller checks state first. Other 4xx raise at once, typed
(see ``_exceptions``): 401/403 that mean the token or the GDAP roles are wrong raise :class:`AccessDeniedError`
naming the fix. httpx's exceptions become ours in one place (:func:`map_transport_errors`), error answers through one
table (:func:`map_error`). Tokens never reach a log line or an exception message.

The client is one class assembled from small ones, each readable alone: :class:`_Sender` (pacing, auth header,
retries, request-id bookkeeping), then the operations by resource (subscriptions, purchases, users and catalog).

Request ids (https://learn.microsoft.com/partner-center/developer/headers): ``MS-RequestId`` is reused only to retry
the same call after a timeout or lost answer; after any response — success or business failure — the next call needs
a new one. Writes take a :class:`RequestAttempt` (operation + key + attempt number, deterministic so a retry after a
crash sends the same id); the caller bumps ``attempt`` after every answer it saw. The client remembers which ids got
an answer and refuses (``strict_request_ids``) or logs ``event=request_id_reused`` when one is sent again.
A 429 or a 5xx is neither a success nor a business failure: the call was not carried out (429) or its outcome is
unknown (5xx), so the client's own retry is the same call and keeps the id (the safe reading: on a service that
dedupes by ``MS-RequestId`` a new id could apply a write twice; the headers page names no other case).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol
from urllib.parse import SplitResult, parse_qsl, quote, urlsplit

import httpx

from ._budget import Budget, budget_for_path
from ._context import log_prefix
from ._exceptions import (
    AccessDeniedError,
    ClientError,
    ConflictError,
    MalformedResponseError,
    NoAvailabilityError,
    NotFoundError,
    PartnerCenterApiError,
    PartnerCenterError,
    PreconditionFailedError,
    ProvisioningNotReadyError,
    PurchaseRejectedError,
    RequestIdReusedError,
    RequestNotSentError,
    ResponseLostError,
    RetryAfterTooLongError,
    ServerError,
    SubscriptionSuspendedError,
    ThrottledError,
    TransportError,
    UncertainWriteError,
    UpdatePendingError,
)
from ._models import (
    Availability,
    Cart,
    CheckoutResult,
    Customer,
    CustomerUser,
    License,
    LicenseUpdateResult,
    Order,
    ProvisioningStatus,
    SubscribedSku,
    Subscription,
    UpdateAccepted,
    collection_items,
    get_ci,
)
from ._native_client import _TransitionOps
from ._ratelimit import Pacer, RateLimiter
from ._settings import is_guid

__all__ = [
    "ETAG_FORMS",
    "EtagForm",
    "PageRequest",
    "PartnerCenterClient",
    "RequestAttempt",
    "RequestIdLike",
    "RequestStats",
    "TokenSource",
    "deterministic_request_id",
    "gdap_roles_for",
    "map_error",
    "map_transport_errors",
    "new_request_id",
]

logger = logging.getLogger("d365_migration.client")

_RETRYABLE_STATUS = {408, 500, 502, 503, 504}
_SAFE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class TokenSource(Protocol):
    async def get_token(self, *, force_refresh: bool = False) -> str: ...


def new_request_id() -> str:
    return str(uuid.uuid4())


def deterministic_request_id(*parts: str) -> str:
    """The same logical operation always gets the same ``MS-RequestId`` (UUID v5 of its parts)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "d365-migration:" + "/".join(p.lower() for p in parts)))


@dataclass(frozen=True)
class RequestAttempt:
    """The ``MS-RequestId`` of one attempt of one logical write, by the documented rule (headers page): the same id
    only to retry the same call after a timeout or lost answer; a new one for the next attempt after any response.

    ``attempt`` is what the caller records (e.g. in the ledger) and bumps with :meth:`next` once it has seen an
    answer — success or business failure. The id is deterministic in (operation, key, attempt), so a process that
    crashed before seeing the answer resends the same id. Sending an id that already got an answer is refused by a
    ``strict_request_ids`` client (:class:`RequestIdReusedError`) and logged otherwise."""

    operation: str
    key: tuple[str, ...]
    attempt: int = 0

    def __post_init__(self) -> None:
        if not self.operation or self.attempt < 0:
            raise ValueError("a RequestAttempt needs an operation and an attempt number >= 0")

    @classmethod
    def first(cls, operation: str, *key: str) -> RequestAttempt:
        return cls(operation, tuple(key), 0)

    @property
    def request_id(self) -> str:
        return deterministic_request_id(self.operation, *self.key, f"attempt-{self.attempt}")

    def next(self) -> RequestAttempt:
        """The attempt after one that got an answer."""
        return RequestAttempt(self.operation, self.key, self.attempt + 1)

    def __str__(self) -> str:
        return self.request_id


RequestIdLike = str | RequestAttempt

#: How ``If-Match`` carries a subscription's ETag (see :meth:`PartnerCenterClient.set_subscription_status`).
EtagForm = Literal["quoted", "as_received"]
ETAG_FORMS: tuple[EtagForm, ...] = ("quoted", "as_received")

# GDAP roles each App+User-only operation needs (Microsoft Learn, "GDAP roles" on each operation's page):
# get-a-list-of-all-user-accounts-for-a-customer, get-a-list-of-available-licenses, assign-licenses-to-a-user,
# get-subscription-provisioning-status.
_GDAP_ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("/licenseupdates", ("License Administrator", "User Administrator", "Directory Writers")),
    ("/upgrades", ("Directory Writers",)),  # transition-a-subscription: upgrade with license transfer
    ("/licenses", ("Directory Reader", "Global Reader", "License Administrator", "User Administrator")),
    ("/subscribedskus", ("Directory Reader", "Global Reader", "User Administrator", "License Administrator")),
    ("/provisioningstatus", ("Directory Reader", "Global Reader")),
    ("/users", ("Directory Reader", "Global Reader", "User Administrator")),
)
_APP_USER_ONLY = tuple(suffix for suffix, _ in _GDAP_ROLES)


def gdap_roles_for(path: str) -> tuple[str, ...]:
    """The GDAP roles (any one suffices) the partner needs in the customer tenant for ``path``."""
    lowered = urlsplit(path).path.lower().rstrip("/")
    for suffix, roles in _GDAP_ROLES:
        if lowered.endswith(suffix) or f"{suffix}/" in lowered:
            return roles
    return ()


def _segment(value: str, what: str) -> str:
    """An id that goes into a URL path: validated, never able to change the path."""
    text = value.strip()
    if not text or len(text) > 128 or not set(text) <= _SAFE_ID or text in (".", ".."):
        raise ValueError(f"{what} {value!r} is not a valid id")
    return quote(text, safe="")


def _guid(value: str, what: str) -> str:
    if not is_guid(value.strip()):
        raise ValueError(f"{what} {value!r} is not a GUID")
    return value.strip()


@dataclass(frozen=True)
class PageRequest:
    """How to fetch one page; serializable, so a page cursor can travel in a queue message or the ledger."""

    path: str
    params: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def is_continuation(self) -> bool:
        """A page after the first (it carries a continuation token or ``seekOperation``)."""
        return (any(k.lower() == "ms-continuationtoken" for k, _ in self.headers)
                or any(k.lower() == "seekoperation" for k, _ in self.params))

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "params": [list(p) for p in self.params],
                "headers": [list(h) for h in self.headers]}

    @classmethod
    def from_json(cls, data: Any) -> PageRequest:
        """Validated: only our API's paths and only the paging header may come back from storage."""
        if not isinstance(data, Mapping) or not isinstance(data.get("path"), str):
            raise ValueError("page cursor must be an object with a path")
        path = _v1_lower(data["path"])
        if not path.startswith("/v1/customers") or ".." in path or "//" in path:
            raise ValueError(f"page cursor path {path!r} is not a Partner Center collection")
        params = tuple((str(k), str(v)) for k, v in data.get("params") or [])
        headers = tuple((str(k), str(v)) for k, v in data.get("headers") or [])
        if any(k.lower() != "ms-continuationtoken" for k, _ in headers):
            raise ValueError("page cursor may carry only MS-ContinuationToken")
        return cls(path, params, headers)


@dataclass
class RequestStats:
    requests: int = 0
    throttled: int = 0
    retries: int = 0



# The one place httpx's transport exceptions become ours (as httpx's map_httpcore_exceptions does for httpcore),
# named by the phase the request reached. Order matters: the first matching row wins.
_TRANSPORT_ERRORS: tuple[tuple[type[httpx.TransportError], type[TransportError], str], ...] = (
    (httpx.ConnectError, RequestNotSentError, "could not connect"),
    (httpx.ConnectTimeout, RequestNotSentError, "could not connect"),
    (httpx.PoolTimeout, RequestNotSentError, "could not connect"),
    (httpx.TransportError, ResponseLostError, "no answer"),
)


@contextlib.contextmanager
def map_transport_errors(method: str, path: str) -> Iterator[None]:
    """Translate an httpx transport exception into :class:`RequestNotSentError` or :class:`ResponseLostError`."""
    try:
        yield
    except httpx.TransportError as exc:
        for httpx_type, ours, text in _TRANSPORT_ERRORS:
            if isinstance(exc, httpx_type):
                raise ours(f"{text} ({type(exc).__name__})", method=method, path=_path_only(path)) from None
        raise  # unreachable: the last row matches every httpx.TransportError


class _Sender:
    """Sends one logical request: pacing, auth header, retries with the same ``MS-RequestId``, error mapping, and
    the record of which write ids got an answer (the headers page: a new id after any response)."""

    def __init__(self, http: httpx.AsyncClient, credential: TokenSource | None,
                 limiters: Mapping[Budget, Pacer | None], *, max_concurrency: int, max_attempts: int,
                 backoff_base: float, backoff_max: float, max_retry_after: float,
                 sleep: Callable[[float], Awaitable[None]], application_name: str, strict_request_ids: bool,
                 stats: RequestStats) -> None:
        self._http = http
        self._credential = credential
        self._limiters = limiters
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._max_attempts = max(1, max_attempts)
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._max_retry_after = max_retry_after
        self._sleep = sleep
        self._random = random.Random()
        self._app_name = application_name
        self._strict_request_ids = strict_request_ids
        # MS-RequestIds of writes that got an answer (bounded; oldest forgotten first).
        self._answered: OrderedDict[str, str] = OrderedDict()
        self.stats = stats

    async def _headers(self, request_id: str, extra: Mapping[str, str] | None, force_refresh: bool) -> dict[str, str]:
        headers = {
            "Accept": "application/json",
            "MS-RequestId": request_id,
            "MS-CorrelationId": new_request_id(),
            "MS-Contract-Version": "v1",
            "MS-PartnerCenter-Application": self._app_name,
        }
        if self._credential is not None:
            token = await self._credential.get_token(force_refresh=force_refresh)
            headers["Authorization"] = f"Bearer {token}"
        if extra:
            headers.update(extra)
        return headers

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads retries of many workers apart.
        return float(self._random.uniform(0, min(self._backoff_max, self._backoff_base * 2**attempt)))

    @property
    def max_retry_after(self) -> float:
        """The longest ``Retry-After`` the client sleeps in one call; longer ones raise RetryAfterTooLongError."""
        return self._max_retry_after

    def _check_request_id(self, request_id: str, method: str, path: str) -> None:
        previous = self._answered.get(request_id.lower())
        if previous is None:
            return
        text = (f"MS-RequestId {request_id} already got an answer ({previous}); the headers page requires a new id "
                "for the next attempt — bump the RequestAttempt")
        if self._strict_request_ids:
            raise RequestIdReusedError(f"{method} {_path_only(path)}: {text}")
        logger.warning("%sevent=request_id_reused %s %s: %s", log_prefix(), method, _path_only(path), text)

    def _remember_answer(self, request_id: str, answer: str) -> None:
        self._answered[request_id.lower()] = answer
        self._answered.move_to_end(request_id.lower())
        while len(self._answered) > 50_000:
            self._answered.popitem(last=False)

    def was_answered(self, request_id: RequestIdLike) -> bool:
        """Did a write with this ``MS-RequestId`` get an answer (success or business failure) in this process?"""
        return str(request_id).lower() in self._answered

    async def send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        request_id: RequestIdLike | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        """The retry loop; returns the first 2xx response."""
        explicit_id = request_id is not None
        request_id = str(request_id) if request_id is not None else new_request_id()
        is_write = method.upper() != "GET"
        if explicit_id and is_write:
            self._check_request_id(request_id, method, path)
        limiter = self._limiters[budget_for_path(path)]
        content = json.dumps(json_body).encode() if json_body is not None else None
        force_refresh = False
        refreshed = False
        last_error: Exception | None = None
        for attempt in range(self._max_attempts):
            server_wait = 0.0  # a 5xx's Retry-After: the next try waits at least that long
            if limiter is not None:
                await limiter.acquire()
            send_headers = await self._headers(request_id, headers, force_refresh)
            force_refresh = False
            if content is not None:
                send_headers["Content-Type"] = "application/json"
            self.stats.requests += 1
            try:
                with map_transport_errors(method, path):
                    async with self._semaphore:
                        response = await self._http.request(method, path, params=params, content=content,
                                                            headers=send_headers)
            except RequestNotSentError as exc:
                last_error = exc  # never reached the server: always safe to send again
            except ResponseLostError as exc:
                if not idempotent:
                    raise  # may have been applied: the caller checks state before sending it again
                last_error = exc
            else:
                status = response.status_code
                if status == 429:
                    retry_after = _retry_after(response, default=self._backoff(attempt) + 1)
                    self.stats.throttled += 1
                    if limiter is not None:
                        limiter.on_throttled(min(retry_after, self._max_retry_after))
                    logger.warning("%sthrottled %s %s: retry after %.1fs", log_prefix(), method, _path_only(path),
                                   retry_after)
                    if retry_after > self._max_retry_after:
                        # Longer than we sleep in one call: not a failure, the caller looks again later
                        # (api-throttling-guidance: wait Retry-After, then retry).
                        raise RetryAfterTooLongError(retry_after, method=method, path=_path_only(path))
                    last_error = ThrottledError(retry_after, method=method, path=_path_only(path))
                    if limiter is None:
                        await self._sleep(retry_after)
                    self.stats.retries += 1
                    continue
                if status == 401 and self._credential is not None and not refreshed:
                    refreshed = force_refresh = True
                    continue
                if status in _RETRYABLE_STATUS:
                    if not idempotent:
                        raise _api_error(response, method, _path_only(path), uncertain_write=True)
                    error = _api_error(response, method, _path_only(path))
                    server_wait = _retry_after(response, default=0.0) if "Retry-After" in response.headers else 0.0
                    if server_wait > self._max_retry_after:
                        raise RetryAfterTooLongError(server_wait, method=method, path=_path_only(path),
                                                     status=status)
                    last_error = error
                elif status >= 400:
                    error = _api_error(response, method, _path_only(path))
                    if is_write and explicit_id:
                        self._remember_answer(request_id, f"HTTP {status} code {getattr(error, 'code', None)}")
                    raise error
                else:
                    if limiter is not None:
                        limiter.on_success()
                    if is_write and explicit_id:
                        self._remember_answer(request_id, f"HTTP {status}")
                    return response
            if attempt + 1 < self._max_attempts:
                self.stats.retries += 1
                # A 503 with Retry-After says when to come back (api-throttling-guidance: wait Retry-After);
                # sooner would only spend an attempt.
                delay = max(self._backoff(attempt), server_wait)
                logger.info("%sretrying %s %s in %.2fs after %s (same MS-RequestId)", log_prefix(), method,
                            _path_only(path), delay, type(last_error).__name__)
                await self._sleep(delay)
        assert last_error is not None
        raise last_error


class _ClientBase:
    """Construction, lifetime and the two primitives every operation uses: :meth:`request` and paging."""


    def __init__(
        self,
        endpoint: str,
        credential: TokenSource | None,
        *,
        requests_per_minute: float | None = 500,
        license_requests_per_minute: float | None = 300,
        max_concurrency: int = 16,
        max_attempts: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        limiters: Mapping[Budget, Pacer] | None = None,
        timeout: httpx.Timeout | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        application_name: str = "d365-migration",
        strict_request_ids: bool = False,
        update_confirm_seconds: float = 30.0,
        confirm_poll_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._credential = credential
        # ``limiters`` (one per budget, e.g. the app's shared budgets from _budget.build_pacers) replace the
        # process-local ones built from the two rates.
        self._limiters: dict[Budget, Pacer | None] = {
            "commerce": RateLimiter(requests_per_minute, sleep=sleep) if requests_per_minute else None,
            "license": RateLimiter(license_requests_per_minute, sleep=sleep) if license_requests_per_minute else None,
            **(limiters or {}),
        }
        self._sleep = sleep
        self._update_confirm_seconds = max(0.0, update_confirm_seconds)
        self._confirm_poll_seconds = max(0.0, confirm_poll_seconds)
        self._clock = clock
        self.stats = RequestStats()
        self._http = httpx.AsyncClient(
            base_url=self._endpoint,
            timeout=timeout or httpx.Timeout(60.0, connect=10.0),
            transport=transport,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max(max_concurrency, 1) * 2),
        )
        self._sender = _Sender(self._http, credential, self._limiters, max_concurrency=max_concurrency,
                               max_attempts=max_attempts, backoff_base=backoff_base, backoff_max=backoff_max,
                               max_retry_after=max_retry_after, sleep=sleep, application_name=application_name,
                               strict_request_ids=strict_request_ids, stats=self.stats)

    @property
    def endpoint(self) -> str:
        return self._endpoint

    async def __aenter__(self) -> PartnerCenterClient:
        return self  # type: ignore[return-value]  # always a PartnerCenterClient

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def max_retry_after(self) -> float:
        """The longest ``Retry-After`` the client sleeps in one call; longer ones raise RetryAfterTooLongError."""
        return self._sender.max_retry_after

    def was_answered(self, request_id: RequestIdLike) -> bool:
        """Did a write with this ``MS-RequestId`` get an answer (success or business failure) in this process?"""
        return self._sender.was_answered(request_id)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        request_id: RequestIdLike | None = None,
        idempotent: bool = True,
        expect_body: bool = True,
    ) -> Any:
        """Send one logical request (with retries) and return the decoded JSON body (None for an empty body).

        :raises PartnerCenterError: typed by status and code (see the module docstring)."""
        response = await self._sender.send(method, path, params=params, json_body=json_body, headers=headers,
                                    request_id=request_id, idempotent=idempotent)
        if not expect_body or not response.content:
            return None
        return _decode(response, method, _path_only(path))

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """:meth:`_Sender.send`: the first 2xx response (for operations that read status codes or headers)."""
        return await self._sender.send(method, path, **kwargs)

    async def fetch_page(self, page: PageRequest, *, what: str, bare_key: str | None = None
                         ) -> tuple[list[Any], PageRequest | None]:
        """One page: its ``items`` and the request for the next page (``None`` on the last).

        The last page may still carry a continuation; following it answers ``400`` code ``2000``, which Microsoft's
        own bulk migration tool treats as "fetched all the records" (Partner-Center-DotNet-Samples,
        nce-bulk-migration-tool CustomerProvider.cs; https://learn.microsoft.com/partner-center/developer/
        get-a-list-of-customers). A continuation page answering that is an empty last page, not an error."""
        try:
            body = await self.request("GET", page.path, params=dict(page.params) or None,
                                      headers=dict(page.headers) or None)
        except ClientError as exc:
            if exc.status == 400 and exc.code == "2000" and page.is_continuation:
                logger.info("%s%s paging ended with code 2000 (end of data)", log_prefix(), what)
                return [], None
            raise
        if not isinstance(body, Mapping):
            raise MalformedResponseError(f"{what} page is not a JSON object", method="GET", path=page.path)
        if get_ci(body, "items") is None and bare_key is not None and get_ci(body, bare_key) is not None:
            return [body], None  # one bare resource where a collection was expected (see collection_items)
        items = get_ci(body, "items")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise MalformedResponseError(f"{what} page 'items' is not a list", method="GET", path=page.path)
        nxt = _next_page(body, page, endpoint=self._endpoint)
        if nxt is not None and nxt == page:
            raise MalformedResponseError(f"{what} paging repeats the same continuation", method="GET",
                                         path=page.path)
        return items, nxt

    async def _paged(self, first: PageRequest, what: str, *, bare_key: str | None = None
                     ) -> AsyncIterator[list[Any]]:
        """Yield the ``items`` of each page, following ``links.next`` or the top-level ``continuationToken``."""
        page: PageRequest | None = first
        seen: set[PageRequest] = set()
        while page is not None:
            items, nxt = await self.fetch_page(page, what=what, bare_key=bare_key)
            yield items
            if nxt is not None and nxt in seen:
                raise MalformedResponseError(f"{what} paging repeats the same continuation", method="GET",
                                             path=first.path)
            seen.add(page)
            page = nxt


class _SubscriptionOps(_ClientBase):
    """Customers and subscriptions: listing, reading, status updates (incl. 202 Accepted), provisioning status."""


    @staticmethod
    def first_customer_page(page_size: int = 500) -> PageRequest:
        return PageRequest("/v1/customers", (("size", str(page_size)),))

    async def customer_page(self, page: PageRequest) -> tuple[list[Customer], PageRequest | None]:
        items, nxt = await self.fetch_page(page, what="customers")
        return [Customer.parse(item) for item in items], nxt

    async def customer_pages(self, *, page_size: int = 500) -> AsyncIterator[list[Customer]]:
        async for items in self._paged(self.first_customer_page(page_size), "customers"):
            yield [Customer.parse(item) for item in items]

    async def list_customers(self, *, page_size: int = 500) -> AsyncIterator[Customer]:
        async for page in self.customer_pages(page_size=page_size):
            for customer in page:
                yield customer

    async def list_subscriptions(self, customer_id: str, *, order_id: str | None = None) -> list[Subscription]:
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/subscriptions"
        params = {"order_id": order_id} if order_id else None
        body = await self.request("GET", path, params=params)
        return [Subscription.parse(item) for item in collection_items(body, "subscriptions", path)]

    async def get_subscription(self, customer_id: str, subscription_id: str) -> Subscription:
        path = self._sub_path(customer_id, subscription_id)
        return Subscription.parse(await self.request("GET", path))

    async def set_subscription_status(self, customer_id: str, subscription: Subscription, *, status: str,
                                      request_id: RequestIdLike, etag_form: EtagForm = "quoted"
                                      ) -> Subscription | UpdateAccepted:
        """PATCH the *whole* resource with the new status and ``If-Match`` (a partial body resets auto-renew).

        Returns the updated subscription (``200``), or :class:`UpdateAccepted` when Partner Center answers
        ``202 Accepted`` with a ``Location`` and no body — "when the patch operation takes longer than the expected
        time … query the subscription periodically" (https://learn.microsoft.com/partner-center/developer/
        update-a-subscription-by-id); confirm with :meth:`confirm_subscription_status`.

        :raises UpdatePendingError: ``409`` ``800082``/``900278``: an earlier update is still pending; look later.
        :raises SubscriptionSuspendedError: ``400 800091``: already suspended (e.g. our earlier PATCH whose answer
            was lost); re-read and complete if that was the goal.
        :raises PreconditionFailedError: the ETag is stale (or, see ``etag_form``, not in the form the service
            compares); re-read and decide again.

        ``etag_form`` is how ``If-Match`` carries the ETag: ``"quoted"`` (default; test-and-debug: "ETags … in double
        quotes") or ``"as_received"``, exactly as the GET returned it (suspend-a-subscription's example sends
        ``If-Match: <etag>`` unquoted). A service that compares literally refuses the other form with 412 / 400
        2055 although nothing changed: the caller that sees that right after a fresh GET, and reads the ETag
        unchanged, sends the PATCH once more with ``etag_form="as_received"`` — as a new attempt (a new
        ``MS-RequestId``: the refusal was an answer), which is why the client does not retry this by itself.
        """
        body = dict(subscription.raw)
        for key in list(body):
            if key.lower() == "status":
                del body[key]
        body["status"] = status
        headers = {"If-Match": _if_match(subscription.etag, etag_form)} if subscription.etag else None
        path = self._sub_path(customer_id, subscription.id)
        response = await self._send("PATCH", path, json_body=body, headers=headers, request_id=request_id)
        if response.status_code == 202 or not response.content.strip():
            return UpdateAccepted(subscription_id=subscription.id, requested_status=status,
                                  location=response.headers.get("Location"))
        return Subscription.parse(_decode(response, "PATCH", _path_only(path)))

    async def confirm_subscription_status(self, customer_id: str, subscription_id: str, status: str, *,
                                          within_seconds: float | None = None,
                                          poll_seconds: float | None = None) -> Subscription:
        """Re-read the subscription until it shows ``status`` (after a ``202 Accepted`` or a lost answer), for at
        most ``within_seconds`` (default: the client's ``update_confirm_seconds``).

        :raises UpdatePendingError: not visible in time; look again later (``retry_after`` = the poll interval).
        """
        limit = self._update_confirm_seconds if within_seconds is None else max(0.0, within_seconds)
        poll = self._confirm_poll_seconds if poll_seconds is None else max(0.0, poll_seconds)
        deadline = self._clock() + limit
        wanted = status.lower()
        while True:
            current = await self.get_subscription(customer_id, subscription_id)
            if current.status == wanted:
                return current
            if self._clock() >= deadline:
                error = UpdatePendingError(
                    202, None, f"subscription {subscription_id} is still {current.status}, not {wanted}, "
                    f"{limit:g}s after the update was accepted; look again later", method="GET",
                    path=self._sub_path(customer_id, subscription_id))
                error.retry_after = max(poll, 1.0)
                raise error
            await self._sleep(poll)

    async def update_subscription(self, customer_id: str, subscription: Subscription, *, status: str,
                                  request_id: RequestIdLike, etag_form: EtagForm = "quoted") -> Subscription:
        """:meth:`set_subscription_status`, then, on ``202 Accepted``, :meth:`confirm_subscription_status`.

        :raises UpdatePendingError: pending (``409``) or accepted but not visible within the confirmation window.
        :raises SubscriptionSuspendedError: ``400 800091`` (see :meth:`set_subscription_status`).
        :raises PreconditionFailedError: see :meth:`set_subscription_status` (and its ``etag_form``).
        """
        result = await self.set_subscription_status(customer_id, subscription, status=status, request_id=request_id,
                                                    etag_form=etag_form)
        if isinstance(result, UpdateAccepted):
            return await self.confirm_subscription_status(customer_id, subscription.id, status)
        return result

    async def get_provisioning_status(self, customer_id: str, subscription_id: str) -> ProvisioningStatus:
        """The subscription's product SKU and provisioning state (App+User only; refreshed about every 15 minutes,
        https://learn.microsoft.com/partner-center/developer/get-subscription-provisioning-status).

        :raises ProvisioningNotReadyError: ``404 800007`` — not available yet for a new subscription; look later.
        :raises AccessDeniedError: ``403``: the partner lacks Directory Reader or Global Reader in the customer.
        """
        path = self._sub_path(customer_id, subscription_id) + "/provisioningstatus"
        try:
            body = await self.request("GET", path)
        except NotFoundError as exc:
            if exc.code == "800007":
                raise ProvisioningNotReadyError(exc.status, exc.code, exc.description, method=exc.method,
                                                path=exc.path, data=exc.data) from None
            raise
        return ProvisioningStatus.parse(body)

    def _sub_path(self, customer_id: str, subscription_id: str) -> str:
        return (f"/v1/customers/{_segment(customer_id, 'customer id')}/subscriptions/"
                f"{_segment(subscription_id, 'subscription id')}")


class _PurchaseOps(_ClientBase):
    """Buying: legacy orders, new-commerce carts and checkout, the catalog availability to buy, finding orders."""


    async def create_order(self, customer_id: str, offer_id: str, quantity: int, *, friendly_name: str,
                           billing_cycle: str, request_id: RequestIdLike,
                           partner_id_on_record: str | None = None) -> Order:
        """Legacy purchase. Not retried blindly after an ambiguous failure: the caller checks state first.

        ``partner_id_on_record`` carries the indirect reseller of the old subscription (order line item
        ``partnerIdOnRecord``, https://learn.microsoft.com/partner-center/developer/order-resources).

        :raises PurchaseRejectedError: a 4xx business failure (``stage="order"``), with Partner Center's code.
        :raises ConflictError: ``409 800060`` "order in progress": treat as possibly placed.
        """
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/orders"
        line_item: dict[str, Any] = {"lineItemNumber": 0, "offerId": _guid(offer_id, "offer id"),
                                     "quantity": quantity, "friendlyName": friendly_name}
        if partner_id_on_record:
            line_item["partnerIdOnRecord"] = _segment(partner_id_on_record, "partner id")
        body = {
            "referenceCustomerId": customer_id,
            "billingCycle": billing_cycle,
            "lineItems": [line_item],
            # create-an-order: "PartnerOnRecordAttestationAccepted | Boolean | Yes | Confirms Attestation
            # completion" (spelled as in its request example).
            "PartnerOnRecordAttestationAccepted": True,
            "attributes": {"objectType": "Order"},
        }
        try:
            return Order.parse(await self.request("POST", path, json_body=body, request_id=request_id,
                                                  idempotent=False))
        except ClientError as exc:
            raise _rejected(exc, "order") from None

    async def list_orders(self, customer_id: str) -> list[Order]:
        """All of the customer's orders (an order may take up to 15 minutes to show, purchase-new-commerce-
        license-based). Find a purchase without tags with :meth:`Order.matches`."""
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/orders"
        body = await self.request("GET", path)
        orders = []
        for item in collection_items(body, "orders", path):
            try:
                orders.append(Order.parse(item))
            except MalformedResponseError:
                continue  # one odd order must not hide ours
        return orders

    async def find_orders(self, customer_id: str, offer_or_product: str, quantity: int, *,
                          created_after: datetime | None = None) -> list[Order]:
        """Orders of ``offer_or_product`` (legacy offer GUID, ``productId:skuId`` or a catalog item id — any
        availability) with ``quantity`` created after ``created_after``: the purchase after a lost answer, found
        without relying on our friendly-name tag."""
        return [o for o in await self.list_orders(customer_id)
                if o.matches(offer_or_product, quantity, created_after=created_after)]

    async def get_order(self, customer_id: str, order_id: str) -> Order:
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/orders/{_segment(order_id, 'order id')}"
        return Order.parse(await self.request("GET", path))

    async def get_customer(self, customer_id: str) -> Customer:
        """The customer (its ``country`` comes from ``billingProfile.defaultAddress`` when present)."""
        return Customer.parse(await self.request("GET", f"/v1/customers/{_segment(customer_id, 'customer id')}"))

    async def list_availabilities(self, product_id: str, sku_id: str, *, country: str,
                                  target_segment: str | None = None) -> list[Availability]:
        """``GET /v1/products/{productId}/skus/{skuId}/availabilities?country=…[&targetSegment=…]``
        (https://learn.microsoft.com/partner-center/developer/get-a-list-of-availabilities-for-a-sku)."""
        path = (f"/v1/products/{_segment(product_id, 'product id')}/skus/{_segment(sku_id, 'sku id')}"
                "/availabilities")
        params = {"country": _country(country)}
        if target_segment:
            params["targetSegment"] = target_segment
        body = await self.request("GET", path, params=params)
        out = []
        # get-a-list-of-availabilities-for-a-sku's new-commerce example answers one bare Availability.
        for item in collection_items(body, "availabilities", path, bare_key="catalogItemId"):
            try:
                out.append(Availability.parse(item))
            except MalformedResponseError:
                continue
        return out

    async def resolve_availability(self, product_id: str, sku_id: str, *, country: str, term_duration: str,
                                   billing_cycle: str, segment: str | None = None) -> Availability:
        """The availability to buy *now*: purchasable in ``country`` and ``segment`` (see
        :func:`~._models.segment_for_audience`) with a term of ``term_duration`` billed ``billing_cycle``. Catalog
        item ids "can change over time … should only be accessed and used at the time of purchase"
        (https://learn.microsoft.com/partner-center/developer/product-resources), so call this right before creating
        the cart and buy ``result.catalog_item_id``.

        ``segment`` goes out as ``targetSegment`` — without it "all segments except nonprofit will be returned"
        (get-a-list-of-availabilities-for-a-sku) — and is checked again on each answer's ``segment``, so a service
        that ignores the filter cannot sell a commercial customer an education availability (create-a-cart: "Ensure
        availability of the catalog item is for the correct segment").

        :raises NoAvailabilityError: none matches (a business failure: record it, naming what was asked for).
        """
        found = await self.list_availabilities(product_id, sku_id, country=country, target_segment=segment)
        found = [a for a in found if a.in_segment(segment)]
        for availability in found:
            if availability.is_purchasable and availability.offers(term_duration, billing_cycle):
                return availability
        offered = sorted({f"{t.duration}/{t.billing_cycle or '?'}" for a in found if a.is_purchasable
                          for t in a.terms})
        where = f"{country.upper()}" + (f", segment {segment}" if segment else "")
        raise NoAvailabilityError(
            404, None, f"no purchasable availability of {product_id}:{sku_id} in {where} for term "
            f"{term_duration} billed {billing_cycle} (offered: {', '.join(offered) or 'nothing'})",
            stage="availability", method="GET", path=f"/v1/products/{product_id}/skus/{sku_id}/availabilities")

    async def create_cart(self, customer_id: str, catalog_item_id: str, quantity: int, *, billing_cycle: str,
                          term_duration: str, friendly_name: str, request_id: RequestIdLike,
                          reseller_partner_id: str | None = None) -> Cart:
        """An unsubmitted cart costs nothing, so creating one is safe to retry.

        ``reseller_partner_id`` carries the indirect reseller of record as the line item's ``participants``
        ``transaction_reseller`` (https://learn.microsoft.com/partner-center/developer/cart-resources).

        :raises PurchaseRejectedError: the cart was refused (``stage="cart"``, e.g. ``400 800009``) or came back
            with a line item ``error`` (``stage="cart_line_item"``; the code is the ``errorCode``).
        """
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/carts"
        line_item: dict[str, Any] = {"id": 0, "catalogItemId": catalog_item_id, "quantity": quantity,
                                     "billingCycle": billing_cycle, "termDuration": term_duration,
                                     "friendlyName": friendly_name}
        if reseller_partner_id:
            line_item["participants"] = [{"key": "transaction_reseller",
                                          "value": _segment(reseller_partner_id, "partner id")}]
        # create-a-cart: "PartnerOnRecordAttestationAccepted | Boolean | Yes | Confirms Attestation completion".
        body = {"PartnerOnRecordAttestationAccepted": True, "lineItems": [line_item],
                "attributes": {"objectType": "Cart"}}
        try:
            cart = Cart.parse(await self.request("POST", path, json_body=body, request_id=request_id))
        except ClientError as exc:
            raise _rejected(exc, "cart") from None
        if cart.line_item_errors:
            first = cart.line_item_errors[0]
            raise PurchaseRejectedError(
                201, first.code, "; ".join(f"line item {e.line_item_id}: {e.code}: {e.description}"
                                           for e in cart.line_item_errors),
                stage="cart_line_item", method="POST", path=path, data={"cart_id": cart.id})
        return cart

    async def checkout_cart(self, customer_id: str, cart_id: str, *, request_id: RequestIdLike) -> CheckoutResult:
        """Checkout is idempotent per cart: a repeat replays the first result
        (https://learn.microsoft.com/partner-center/developer/checkout-a-cart). ``orderErrors`` come back in the
        result; :meth:`CheckoutResult.rejection` turns them into a :class:`PurchaseRejectedError`.

        Not retried here after a lost answer: a repeat may be refused (an expired cart answers ``404 800008``) where
        the first checkout bought, and only the caller knows it is a repeat (the purchase step records the checkout as
        sent before it goes, and never takes a refused repeat for "nothing was bought").

        :raises PurchaseRejectedError: a 4xx business failure (``stage="checkout"``, e.g. ``404 400019``
            availability not found, ``403 13605``), except ``800065`` (already submitted: find what it created).
        :raises ConflictError: ``409 800064`` cart being processed.
        :raises ResponseLostError | UncertainWriteError: the answer was lost; the checkout may have been applied.
        """
        path = (f"/v1/customers/{_segment(customer_id, 'customer id')}/carts/"
                f"{_segment(cart_id, 'cart id')}/checkout")
        try:
            return CheckoutResult.parse(await self.request("POST", path, request_id=request_id, idempotent=False))
        except ClientError as exc:
            if exc.code == "800065":
                raise
            raise _rejected(exc, "checkout") from None


class _UserOps(_ClientBase):
    """Users and licenses (App+User only), and the read-only new-commerce catalog."""


    @staticmethod
    def first_user_page(customer_id: str, page_size: int = 100) -> PageRequest:
        return PageRequest(f"/v1/customers/{_segment(customer_id, 'customer id')}/users",
                           (("size", str(page_size)),))

    async def user_page(self, page: PageRequest) -> tuple[list[CustomerUser], PageRequest | None]:
        items, nxt = await self.fetch_page(page, what="users")
        return [CustomerUser.parse(item) for item in items], nxt

    async def list_users(self, customer_id: str, *, page_size: int = 100) -> AsyncIterator[CustomerUser]:
        async for items in self._paged(self.first_user_page(customer_id, page_size), "users"):
            for item in items:
                yield CustomerUser.parse(item)

    async def get_user_licenses(self, customer_id: str, user_id: str) -> list[License]:
        path = (f"/v1/customers/{_segment(customer_id, 'customer id')}/users/"
                f"{_segment(user_id, 'user id')}/licenses")
        body = await self.request("GET", path)
        return [License.parse(item) for item in collection_items(body, "licenses", path)]

    async def list_subscribed_skus(self, customer_id: str) -> list[SubscribedSku]:
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/subscribedskus"
        body = await self.request("GET", path)
        return [SubscribedSku.parse(item) for item in collection_items(body, "subscribedskus", path)]

    async def update_user_licenses(self, customer_id: str, user_id: str, *, assign: Sequence[str],
                                   remove: Sequence[str], request_id: RequestIdLike) -> LicenseUpdateResult:
        """Assign and remove in one call, so the user is never without the product. Returns the answer's
        ``licenseWarnings`` (https://learn.microsoft.com/partner-center/developer/assign-licenses-to-a-user).

        :raises AccessDeniedError: MFA missing (``401 900421``), Conditional Access (``403 900309``), app-only token
            (``400 900316``), or GDAP roles missing (``403 900308``): stop the step once, not per user.
        """
        path = (f"/v1/customers/{_segment(customer_id, 'customer id')}/users/"
                f"{_segment(user_id, 'user id')}/licenseupdates")
        body = {
            "licensesToAssign": [{"skuId": sku, "excludedPlans": None} for sku in assign],
            "licensesToRemove": list(remove),
            "attributes": {"objectType": "LicenseUpdate"},
        }
        answer = await self.request("POST", path, json_body=body, request_id=request_id)
        result = LicenseUpdateResult.parse(answer)
        for warning in result.warnings:
            logger.warning("%sevent=license_warning user=%s code=%s %s", log_prefix(), user_id, warning.code,
                           warning.message[:200])
        return result

    # ------------------------------------------------------------------ new-commerce catalog (read-only)
    # Learn: partner-center/developer/get-a-list-of-products, get-a-list-of-skus-for-a-product,
    # get-a-list-of-availabilities-for-a-sku, product-resources. Items are returned as Partner Center sends them
    # (read them with get_ci: names are matched case-insensitively).

    @staticmethod
    def _catalog_params(country: str, target_segment: str | None, **extra: str) -> tuple[tuple[str, str], ...]:
        code = country.strip().upper()
        if len(code) != 2 or not code.isalpha():
            raise ValueError(f"country {country!r} is not a two-letter country code")
        params = [("country", code), *extra.items()]
        if target_segment:
            params.append(("targetSegment", target_segment))
        return tuple(params)

    async def _catalog_items(self, path: str, params: tuple[tuple[str, str], ...], what: str, *,
                             bare_key: str | None = None) -> list[Any]:
        items: list[Any] = []
        async for page in self._paged(PageRequest(path, params), what, bare_key=bare_key):
            items.extend(page)
        return items

    async def list_products(self, country: str, *, target_view: str = "OnlineServices",
                            target_segment: str | None = None) -> list[Mapping[str, Any]]:
        """``GET /v1/products?country=&targetView=[&targetSegment=]`` (every page)."""
        params = self._catalog_params(country, target_segment, targetView=target_view)
        return [i for i in await self._catalog_items("/v1/products", params, "products") if isinstance(i, Mapping)]

    async def list_skus(self, product_id: str, country: str, *, target_segment: str | None = None
                        ) -> list[Mapping[str, Any]]:
        """``GET /v1/products/{productId}/skus?country=[&targetSegment=]``."""
        path = f"/v1/products/{_segment(product_id, 'product id')}/skus"
        items = await self._catalog_items(path, self._catalog_params(country, target_segment), "skus")
        return [i for i in items if isinstance(i, Mapping)]

    async def list_availability_documents(self, product_id: str, sku_id: str, country: str, *,
                                          target_segment: str | None = None) -> list[Mapping[str, Any]]:
        """``GET /v1/products/{productId}/skus/{skuId}/availabilities?country=[&targetSegment=]``, every page, as
        the service sent them (the ``offers`` report reads fields the typed :class:`Availability` leaves out)."""
        path = (f"/v1/products/{_segment(product_id, 'product id')}/skus/{_segment(sku_id, 'sku id')}"
                "/availabilities")
        items = await self._catalog_items(path, self._catalog_params(country, target_segment), "availabilities",
                                          bare_key="catalogItemId")
        return [i for i in items if isinstance(i, Mapping)]


class PartnerCenterClient(_SubscriptionOps, _PurchaseOps, _UserOps, _TransitionOps):
    """One client per process; share it between concurrent operations.

    ``PartnerCenterClient(endpoint, credential, *, requests_per_minute=500, license_requests_per_minute=300, ...)``;
    use as ``async with``. Operations raise the typed errors of :mod:`._exceptions`.
    """


# ---------------------------------------------------------------------- helpers


def _path_only(path: str) -> str:
    return urlsplit(path).path


def _quote_etag(etag: str) -> str:
    return etag if etag.startswith(('"', "W/")) else f'"{etag}"'


def _if_match(etag: str, form: EtagForm) -> str:
    if form == "as_received":
        return etag
    if form == "quoted":
        return _quote_etag(etag)
    raise ValueError(f"etag_form {form!r} is not one of {ETAG_FORMS}")


def _retry_after(response: httpx.Response, *, default: float) -> float:
    raw = response.headers.get("Retry-After")
    if raw is None:
        return default
    try:
        return max(0.0, float(raw.strip()))
    except ValueError:
        pass
    # RFC 9110 also allows an HTTP-date (api-throttling-guidance shows seconds; a proxy in front may send a date).
    try:
        when = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError):
        return default
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _decode(response: httpx.Response, method: str, path: str) -> Any:
    content_type = response.headers.get("Content-Type", "")
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        kind = "HTML" if "html" in content_type.lower() or response.content.lstrip()[:1] == b"<" else "non-JSON"
        raise MalformedResponseError(
            f"HTTP {response.status_code} with a {kind} body ({len(response.content)} bytes) where JSON was "
            "expected", method=method, path=path) from None


def _country(value: str) -> str:
    text = value.strip().upper()
    if len(text) != 2 or not text.isalpha():
        raise ValueError(f"country {value!r} is not an ISO 3166 alpha-2 code")
    return text


def _rejected(exc: ClientError, stage: str) -> PartnerCenterApiError:
    """A purchase call's 4xx as a business failure, except the ones that mean "look again" (409, 412)."""
    if isinstance(exc, (ConflictError, PreconditionFailedError, PurchaseRejectedError)):
        return exc
    rejected = PurchaseRejectedError(exc.status, exc.code, exc.description, stage=stage, method=exc.method,
                                     path=exc.path, data=exc.data, error_name=exc.error_name)
    return rejected


# Partner Center error codes that mean the token or the roles are wrong (error-codes page; MFA enforcement of
# App+User calls answers 401 with 900421): every call of the kind will fail the same way.
_AUTH_CODES: dict[str, tuple[str, str]] = {
    "900421": ("mfa_required", "the partner account's token carries no MFA claim: sign it in again with Microsoft "
               "Entra MFA (`python -m d365_migration consent`) so the stored refresh token is MFA-backed"),
    "900309": ("conditional_access", "a Conditional Access policy blocked the token: let the partner service account "
               "satisfy the policy (or exclude it), then `python -m d365_migration consent`"),
    "900316": ("app_only_token", "user and license calls need an App+User token (Secure Application Model), not "
               "app-only: set PARTNER_CENTER_AUTH=app-user and run `python -m d365_migration consent`"),
    "900329": ("app_only_token", "this resource does not accept app-only tokens: use App+User (Secure Application "
               "Model) and run `python -m d365_migration consent`"),
    "800001": ("unauthorized", "the request carried no usable partner token: check PARTNER_CENTER_AUTH and run "
               "`python -m d365_migration consent`"),
    "900308": ("insufficient_privileges", ""),
}


def _access_denied(status: int, code: str | None, description: str, method: str, path: str
                   ) -> AccessDeniedError | None:
    """401/403 (and 400 900316) that mean the token or the roles are wrong, else None (a business failure)."""
    roles = gdap_roles_for(path)
    known = _AUTH_CODES.get(code or "")
    app_user_only_route = any(_path_only(path).lower().rstrip("/").endswith(s) or f"{s}/" in path.lower()
                              for s in _APP_USER_ONLY)
    if known is None:
        if status == 401 or (status == 403 and "mfa" in description.lower()):
            reason = "mfa_required" if "mfa" in description.lower() else "unauthorized"
            known = (reason, _AUTH_CODES["900421" if reason == "mfa_required" else "800001"][1])
        elif status == 403 and app_user_only_route and code in (None, "403"):
            known = ("insufficient_privileges", "")
        else:
            return None
    reason, fix = known
    if reason == "insufficient_privileges":
        fix = ("the partner's GDAP relationship with this customer lacks the directory role for this call: assign "
               "the partner's security group one of " + (", ".join(roles) if roles else "the roles the operation "
               "lists") + " in the customer's GDAP relationship (Partner Center → Customers → Admin relationships)")
    return AccessDeniedError(status, code, description, reason=reason, fix=fix, roles=roles, method=method,
                             path=path)


# Error answer → exception class: by (status, Partner Center code) first, then by status, then by status class.
# (401/403 that mean the token or the GDAP roles are wrong are decided first, by _access_denied.)
_ERROR_FOR_CODE: dict[tuple[int, str], type[PartnerCenterApiError]] = {
    (400, "2055"): PreconditionFailedError,  # "the ETag is no longer valid", sent as a 400
    # update-a-subscription-by-id / error-codes: 800082 "not ready to be updated", 900278 "pending operation".
    (409, "800082"): UpdatePendingError,
    (409, "900278"): UpdatePendingError,
    (400, "800091"): SubscriptionSuspendedError,  # a repeated suspend: re-read, complete if suspended
}
_ERROR_FOR_STATUS: dict[int, type[PartnerCenterApiError]] = {
    404: NotFoundError,
    409: ConflictError,
    412: PreconditionFailedError,
}


def map_error(status: int, code: str | None, *, uncertain_write: bool = False) -> type[PartnerCenterApiError]:
    """The exception class for an error answer (``uncertain_write``: a 5xx to a write that may have been applied)."""
    if code is not None and (status, code) in _ERROR_FOR_CODE:
        return _ERROR_FOR_CODE[status, code]
    if status in _ERROR_FOR_STATUS:
        return _ERROR_FOR_STATUS[status]
    if status >= 500:
        return UncertainWriteError if uncertain_write else ServerError
    return ClientError


def _api_error(response: httpx.Response, method: str, path: str, *,
               uncertain_write: bool = False) -> PartnerCenterError:
    """Both documented error shapes: ``{code, description, data, source}`` and ``{code, message, errorName…}``."""
    status = response.status_code
    code: str | None = None
    description = response.reason_phrase or f"HTTP {status}"
    data: Any = None
    error_name: str | None = None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, Mapping):
        raw_code = get_ci(body, "code")
        if raw_code is None:
            raw_code = get_ci(body, "statusCode")
        code = str(raw_code) if raw_code is not None and not isinstance(raw_code, (dict, list)) else None
        text = get_ci(body, "description") or get_ci(body, "message")
        if isinstance(text, str) and text.strip():
            description = text.strip()[:1024]
        data = get_ci(body, "data")
        name = get_ci(body, "errorName")
        error_name = name if isinstance(name, str) else None
    if status in (400, 401, 403):
        denied = _access_denied(status, code, description, method, path)
        if denied is not None:
            return denied
    cls = map_error(status, code, uncertain_write=uncertain_write)
    return cls(status, code, description, method=method, path=path, data=data, error_name=error_name)


def _v1_lower(path: str) -> str:
    """``/V1/…`` → ``/v1/…``: Partner Center matches paths case-insensitively; our checks and cursors use /v1."""
    return "/v1" + path[3:] if path[:4].lower() == "/v1/" else path


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(parts: SplitResult) -> tuple[str, str, int | None] | None:
    try:
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


def _path_on_endpoint(parts: SplitResult, endpoint: str) -> str | None:
    """The path of an absolute URI on ``endpoint`` (same scheme, host and port) with the endpoint's own path
    prefix taken off, or None when it is elsewhere."""
    base = urlsplit(endpoint)
    origin = _origin(parts)
    if origin is None or origin != _origin(base) or not origin[1]:
        return None
    prefix = base.path.rstrip("/")
    if not prefix:
        return parts.path or "/"
    if parts.path.lower() == prefix.lower() or parts.path.lower().startswith(prefix.lower() + "/"):
        return parts.path[len(prefix):] or "/"
    return None


def _next_page(body: Mapping[str, Any], page: PageRequest, *, endpoint: str = "") -> PageRequest | None:
    links = get_ci(body, "links")
    nxt = get_ci(links, "next") if isinstance(links, Mapping) else None
    if isinstance(nxt, Mapping):
        uri = get_ci(nxt, "uri")
        if isinstance(uri, str) and uri.strip():
            headers: list[tuple[str, str]] = []
            raw_headers = get_ci(nxt, "headers") or []
            for header in raw_headers if isinstance(raw_headers, list) else []:
                if isinstance(header, Mapping):
                    key, value = get_ci(header, "key"), get_ci(header, "value")
                    # Only the paging header is forwarded: a response must not be able to set Authorization.
                    if isinstance(key, str) and isinstance(value, str) and key.lower() == "ms-continuationtoken":
                        headers.append(("MS-ContinuationToken", value))
            parts = urlsplit(uri.strip())
            path: str | None = parts.path
            if parts.scheme or parts.netloc:
                # The SDK calls links.next.uri "exactly as given": an absolute one on our own endpoint is followed
                # (without the endpoint's path prefix, which the client adds back); another host never is.
                path = _path_on_endpoint(parts, endpoint)
            if path is None:
                raise MalformedResponseError("links.next points at another host; refusing to follow",
                                             method="GET", path=page.path)
            path = _v1_lower(path if path.startswith("/") else "/" + path)
            if not path.startswith("/v1/"):
                path = "/v1" + path  # documented links are relative to /v1 (/customers?size=…)
            return PageRequest(path, tuple(parse_qsl(parts.query, keep_blank_values=True)), tuple(headers))
    token = get_ci(body, "continuationToken")
    if isinstance(token, str) and token.strip():
        params = (*((k, v) for k, v in page.params if k.lower() != "seekoperation"), ("seekOperation", "next"))
        return PageRequest(page.path, params, (("MS-ContinuationToken", token),))
    return None
