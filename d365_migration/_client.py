"""An async Partner Center REST client on httpx.

``PartnerCenterClient(endpoint, credential, *, ...)`` follows the Azure SDK shape: keyword-only options, paging hidden
behind async iterators, typed errors carrying Partner Center's ``code`` and ``description``.

Retries: 429 waits ``Retry-After`` (and slows the shared limiter); 5xx, 408 and transport errors are retried with
exponential backoff and jitter, always with the *same* ``MS-RequestId`` (Partner Center's headers page: reuse it when
a call timed out; a new one once a response arrived). A write that may have been applied without us seeing the
answer (``idempotent=False``) is not retried blindly: it raises :class:`ResponseLostError` or
:class:`UncertainWriteError` (``maybe_applied``) and the caller checks state first. Other 4xx raise at once. httpx's
exceptions become ours in one place (:func:`map_transport_errors`), error answers through one table
(:func:`map_error`). Tokens never reach a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, quote, urlsplit

import httpx

from ._context import log_prefix
from ._exceptions import (
    ClientError,
    ConflictError,
    MalformedResponseError,
    NotFoundError,
    PartnerCenterApiError,
    PreconditionFailedError,
    RequestNotSentError,
    ResponseLostError,
    ServerError,
    ThrottledError,
    TransportError,
    UncertainWriteError,
)
from ._models import (
    Cart,
    CheckoutResult,
    Customer,
    CustomerUser,
    License,
    Order,
    ProvisioningStatus,
    SubscribedSku,
    Subscription,
    get_ci,
)
from ._ratelimit import RateLimiter
from ._settings import is_guid

__all__ = [
    "PageRequest",
    "PartnerCenterClient",
    "RateClass",
    "RequestStats",
    "TokenSource",
    "deterministic_request_id",
    "map_error",
    "map_transport_errors",
    "new_request_id",
]

logger = logging.getLogger("d365_migration.client")

RateClass = Literal["commerce", "license"]
_RETRYABLE_STATUS = {408, 500, 502, 503, 504}
_SAFE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class TokenSource(Protocol):
    async def get_token(self, *, force_refresh: bool = False) -> str: ...


def new_request_id() -> str:
    return str(uuid.uuid4())


def deterministic_request_id(*parts: str) -> str:
    """The same logical operation always gets the same ``MS-RequestId`` (UUID v5 of its parts)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "d365-migration:" + "/".join(p.lower() for p in parts)))


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

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "params": [list(p) for p in self.params],
                "headers": [list(h) for h in self.headers]}

    @classmethod
    def from_json(cls, data: Any) -> PageRequest:
        """Validated: only our API's paths and only the paging header may come back from storage."""
        if not isinstance(data, Mapping) or not isinstance(data.get("path"), str):
            raise ValueError("page cursor must be an object with a path")
        path = data["path"]
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
    """Sends one logical request: pacing, auth header, retries with the same ``MS-RequestId``, error mapping."""

    def __init__(self, http: httpx.AsyncClient, credential: TokenSource | None,
                 limiters: Mapping[RateClass, RateLimiter | None], *, max_concurrency: int, max_attempts: int,
                 backoff_base: float, backoff_max: float, max_retry_after: float,
                 sleep: Callable[[float], Awaitable[None]], application_name: str, stats: RequestStats) -> None:
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

    async def send(self, method: str, path: str, *, params: Mapping[str, str] | None, json_body: Any,
                   headers: Mapping[str, str] | None, request_id: str, rate_class: RateClass, idempotent: bool,
                   expect_body: bool) -> Any:
        limiter = self._limiters[rate_class]
        content = json.dumps(json_body).encode() if json_body is not None else None
        force_refresh = refreshed = False
        last_error: Exception | None = None
        for attempt in range(self._max_attempts):
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
                    last_error = ThrottledError(retry_after, method=method, path=_path_only(path))
                    if retry_after > self._max_retry_after:
                        raise last_error
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
                    last_error = _api_error(response, method, _path_only(path))
                elif status >= 400:
                    raise _api_error(response, method, _path_only(path))
                else:
                    if limiter is not None:
                        limiter.on_success()
                    if not expect_body or not response.content:
                        return None
                    return _decode(response, method, _path_only(path))
            if attempt + 1 < self._max_attempts:
                self.stats.retries += 1
                delay = self._backoff(attempt)
                logger.info("%sretrying %s %s in %.2fs after %s (same MS-RequestId)", log_prefix(), method,
                            _path_only(path), delay, type(last_error).__name__)
                await self._sleep(delay)
        assert last_error is not None
        raise last_error


class PartnerCenterClient:
    """One client per process; share it between concurrent operations."""

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
        timeout: httpx.Timeout | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        application_name: str = "d365-migration",
    ) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._limiters: dict[RateClass, RateLimiter | None] = {
            "commerce": RateLimiter(requests_per_minute, sleep=sleep) if requests_per_minute else None,
            "license": RateLimiter(license_requests_per_minute, sleep=sleep) if license_requests_per_minute else None,
        }
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
                               stats=self.stats)

    @property
    def endpoint(self) -> str:
        return self._endpoint

    async def __aenter__(self) -> PartnerCenterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ plumbing

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
        rate_class: RateClass = "commerce",
        idempotent: bool = True,
        expect_body: bool = True,
    ) -> Any:
        """Send one logical request (with retries) and return the decoded JSON body.

        :raises RequestNotSentError: Partner Center could not be reached (after retries).
        :raises ResponseLostError: no answer came back (after retries; at once for a write with
            ``idempotent=False``, which may have been applied).
        :raises PartnerCenterApiError: an error answer (a subclass per status; see ``_exceptions``).
        :raises MalformedResponseError: an answer that is not JSON.
        """
        return await self._sender.send(method, path, params=params, json_body=json_body, headers=headers,
                                       request_id=request_id or new_request_id(), rate_class=rate_class,
                                       idempotent=idempotent, expect_body=expect_body)

    async def fetch_page(self, page: PageRequest, *, rate_class: RateClass, what: str
                         ) -> tuple[list[Any], PageRequest | None]:
        """One page: its ``items`` and the request for the next page (``None`` on the last)."""
        body = await self.request("GET", page.path, params=dict(page.params) or None,
                                  headers=dict(page.headers) or None, rate_class=rate_class)
        if not isinstance(body, Mapping):
            raise MalformedResponseError(f"{what} page is not a JSON object", method="GET", path=page.path)
        items = get_ci(body, "items")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise MalformedResponseError(f"{what} page 'items' is not a list", method="GET", path=page.path)
        nxt = _next_page(body, page)
        if nxt is not None and nxt == page:
            raise MalformedResponseError(f"{what} paging repeats the same continuation", method="GET",
                                         path=page.path)
        return items, nxt

    async def _paged(self, first: PageRequest, rate_class: RateClass, what: str) -> AsyncIterator[list[Any]]:
        """Yield the ``items`` of each page, following ``links.next`` or the top-level ``continuationToken``."""
        page: PageRequest | None = first
        seen: set[PageRequest] = set()
        while page is not None:
            items, nxt = await self.fetch_page(page, rate_class=rate_class, what=what)
            yield items
            if nxt is not None and nxt in seen:
                raise MalformedResponseError(f"{what} paging repeats the same continuation", method="GET",
                                             path=first.path)
            seen.add(page)
            page = nxt

    # ------------------------------------------------------------------ customers & subscriptions

    @staticmethod
    def first_customer_page(page_size: int = 500) -> PageRequest:
        return PageRequest("/v1/customers", (("size", str(page_size)),))

    async def customer_page(self, page: PageRequest) -> tuple[list[Customer], PageRequest | None]:
        items, nxt = await self.fetch_page(page, rate_class="commerce", what="customers")
        return [Customer.parse(item) for item in items], nxt

    async def customer_pages(self, *, page_size: int = 500) -> AsyncIterator[list[Customer]]:
        async for items in self._paged(self.first_customer_page(page_size), "commerce", "customers"):
            yield [Customer.parse(item) for item in items]

    async def list_customers(self, *, page_size: int = 500) -> AsyncIterator[Customer]:
        async for page in self.customer_pages(page_size=page_size):
            for customer in page:
                yield customer

    async def list_subscriptions(self, customer_id: str, *, order_id: str | None = None) -> list[Subscription]:
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/subscriptions"
        params = {"order_id": order_id} if order_id else None
        body = await self.request("GET", path, params=params)
        return [Subscription.parse(item) for item in _items(body, "subscriptions", path)]

    async def get_subscription(self, customer_id: str, subscription_id: str) -> Subscription:
        path = self._sub_path(customer_id, subscription_id)
        return Subscription.parse(await self.request("GET", path))

    async def update_subscription(self, customer_id: str, subscription: Subscription, *, status: str,
                                  request_id: str) -> Subscription:
        """PATCH the *whole* resource with the new status and ``If-Match`` (a partial body resets auto-renew)."""
        body = dict(subscription.raw)
        for key in list(body):
            if key.lower() == "status":
                del body[key]
        body["status"] = status
        headers = {"If-Match": _quote_etag(subscription.etag)} if subscription.etag else None
        path = self._sub_path(customer_id, subscription.id)
        return Subscription.parse(await self.request("PATCH", path, json_body=body, headers=headers,
                                                     request_id=request_id))

    async def get_provisioning_status(self, customer_id: str, subscription_id: str) -> ProvisioningStatus:
        path = self._sub_path(customer_id, subscription_id) + "/provisioningstatus"
        return ProvisioningStatus.parse(await self.request("GET", path, rate_class="license"))

    def _sub_path(self, customer_id: str, subscription_id: str) -> str:
        return (f"/v1/customers/{_segment(customer_id, 'customer id')}/subscriptions/"
                f"{_segment(subscription_id, 'subscription id')}")

    # ------------------------------------------------------------------ purchase

    async def create_order(self, customer_id: str, offer_id: str, quantity: int, *, friendly_name: str,
                           billing_cycle: str, request_id: str) -> Order:
        """Legacy purchase. Not retried blindly after an ambiguous failure: the caller checks state first."""
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/orders"
        body = {
            "referenceCustomerId": customer_id,
            "billingCycle": billing_cycle,
            "lineItems": [{"lineItemNumber": 0, "offerId": _guid(offer_id, "offer id"), "quantity": quantity,
                           "friendlyName": friendly_name}],
            "attributes": {"objectType": "Order"},
        }
        return Order.parse(await self.request("POST", path, json_body=body, request_id=request_id,
                                              idempotent=False))

    async def list_orders(self, customer_id: str) -> list[Order]:
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/orders"
        body = await self.request("GET", path)
        orders = []
        for item in _items(body, "orders", path):
            try:
                orders.append(Order.parse(item))
            except MalformedResponseError:
                continue  # one odd order must not hide ours
        return orders

    async def get_order(self, customer_id: str, order_id: str) -> Order:
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/orders/{_segment(order_id, 'order id')}"
        return Order.parse(await self.request("GET", path))

    async def create_cart(self, customer_id: str, catalog_item_id: str, quantity: int, *, billing_cycle: str,
                          term_duration: str, friendly_name: str, request_id: str) -> Cart:
        """An unsubmitted cart costs nothing, so creating one is safe to retry."""
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/carts"
        body = {
            "lineItems": [{"id": 0, "catalogItemId": catalog_item_id, "quantity": quantity,
                           "billingCycle": billing_cycle, "termDuration": term_duration,
                           "friendlyName": friendly_name}],
            "attributes": {"objectType": "Cart"},
        }
        return Cart.parse(await self.request("POST", path, json_body=body, request_id=request_id))

    async def checkout_cart(self, customer_id: str, cart_id: str, *, request_id: str) -> CheckoutResult:
        """Checkout is idempotent per cart: a repeat replays the first result, so retries are safe."""
        path = (f"/v1/customers/{_segment(customer_id, 'customer id')}/carts/"
                f"{_segment(cart_id, 'cart id')}/checkout")
        return CheckoutResult.parse(await self.request("POST", path, request_id=request_id))

    # ------------------------------------------------------------------ users & licenses (App+User only)

    @staticmethod
    def first_user_page(customer_id: str, page_size: int = 100) -> PageRequest:
        return PageRequest(f"/v1/customers/{_segment(customer_id, 'customer id')}/users",
                           (("size", str(page_size)),))

    async def user_page(self, page: PageRequest) -> tuple[list[CustomerUser], PageRequest | None]:
        items, nxt = await self.fetch_page(page, rate_class="license", what="users")
        return [CustomerUser.parse(item) for item in items], nxt

    async def list_users(self, customer_id: str, *, page_size: int = 100) -> AsyncIterator[CustomerUser]:
        async for items in self._paged(self.first_user_page(customer_id, page_size), "license", "users"):
            for item in items:
                yield CustomerUser.parse(item)

    async def get_user_licenses(self, customer_id: str, user_id: str) -> list[License]:
        path = (f"/v1/customers/{_segment(customer_id, 'customer id')}/users/"
                f"{_segment(user_id, 'user id')}/licenses")
        body = await self.request("GET", path, rate_class="license")
        return [License.parse(item) for item in _items(body, "licenses", path)]

    async def list_subscribed_skus(self, customer_id: str) -> list[SubscribedSku]:
        path = f"/v1/customers/{_segment(customer_id, 'customer id')}/subscribedskus"
        body = await self.request("GET", path, rate_class="license")
        return [SubscribedSku.parse(item) for item in _items(body, "subscribedskus", path)]

    async def update_user_licenses(self, customer_id: str, user_id: str, *, assign: Sequence[str],
                                   remove: Sequence[str], request_id: str) -> None:
        """Assign and remove in one call, so the user is never without the product."""
        path = (f"/v1/customers/{_segment(customer_id, 'customer id')}/users/"
                f"{_segment(user_id, 'user id')}/licenseupdates")
        body = {
            "licensesToAssign": [{"skuId": sku, "excludedPlans": None} for sku in assign],
            "licensesToRemove": list(remove),
            "attributes": {"objectType": "LicenseUpdate"},
        }
        await self.request("POST", path, json_body=body, request_id=request_id, rate_class="license",
                           expect_body=False)


# ---------------------------------------------------------------------- helpers


def _path_only(path: str) -> str:
    return urlsplit(path).path


def _quote_etag(etag: str) -> str:
    return etag if etag.startswith(('"', "W/")) else f'"{etag}"'


def _retry_after(response: httpx.Response, *, default: float) -> float:
    raw = response.headers.get("Retry-After")
    if raw is None:
        return default
    try:
        return max(0.0, float(raw.strip()))
    except ValueError:
        return default


def _decode(response: httpx.Response, method: str, path: str) -> Any:
    content_type = response.headers.get("Content-Type", "")
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        kind = "HTML" if "html" in content_type.lower() or response.content.lstrip()[:1] == b"<" else "non-JSON"
        raise MalformedResponseError(
            f"HTTP {response.status_code} with a {kind} body ({len(response.content)} bytes) where JSON was "
            "expected", method=method, path=path) from None


# Error answer → exception class: by (status, Partner Center code) first, then by status, then by status class.
_ERROR_FOR_CODE: dict[tuple[int, str], type[PartnerCenterApiError]] = {
    (400, "2055"): PreconditionFailedError,  # "the ETag is no longer valid", sent as a 400
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
               uncertain_write: bool = False) -> PartnerCenterApiError:
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
    cls = map_error(status, code, uncertain_write=uncertain_write)
    return cls(status, code, description, method=method, path=path, data=data, error_name=error_name)


def _items(body: Any, what: str, path: str) -> list[Any]:
    if not isinstance(body, Mapping):
        raise MalformedResponseError(f"{what} response is not a JSON object", method="GET", path=path)
    items = get_ci(body, "items")
    if items is None:
        return []
    if not isinstance(items, list):
        raise MalformedResponseError(f"{what} 'items' is not a list", method="GET", path=path)
    return items


def _next_page(body: Mapping[str, Any], page: PageRequest) -> PageRequest | None:
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
            if parts.scheme or parts.netloc:
                raise MalformedResponseError("links.next points at another host; refusing to follow",
                                             method="GET", path=page.path)
            path = parts.path if parts.path.lower().startswith("/v1/") else "/v1" + (
                parts.path if parts.path.startswith("/") else "/" + parts.path)
            return PageRequest(path, tuple(parse_qsl(parts.query, keep_blank_values=True)), tuple(headers))
    token = get_ci(body, "continuationToken")
    if isinstance(token, str) and token.strip():
        params = (*((k, v) for k, v in page.params if k.lower() != "seekoperation"), ("seekOperation", "next"))
        return PageRequest(page.path, params, (("MS-ContinuationToken", token),))
    return None
