"""The ASGI app: Partner Center routes (Starlette) wrapped in an outer layer for headers, auth, throttling, faults."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import Message, Receive, Scope, Send

from ._catalog import product_mapping
from ._config import SandboxConfig
from ._faults import SlidingWindow, is_app_only, jwt_payload
from ._prices import handle_price_sheet
from ._products import product_routes
from ._seed import seed_world
from ._state import ApiError, SandboxState, link
from ._transitions import transition_routes

JSON_CT = "application/json; charset=utf-8"
DEFAULT_PAGE = 100
MAX_PAGE = 500
WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type=JSON_CT, headers=headers)


def _collection(items: list[dict[str, Any]], self_uri: str) -> dict[str, Any]:
    return {
        "totalCount": len(items),
        "items": items,
        "links": {"self": link(self_uri)},
        "attributes": {"objectType": "Collection"},
    }


def _query(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.query_params.items()}


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(400, 800002, "Invalid request input: the body is not valid JSON.") from None


def _page_size(q: dict[str, str]) -> int:
    raw = q.get("size")
    if raw is None or raw == "":
        return DEFAULT_PAGE
    try:
        size = int(raw)
    except ValueError:
        raise ApiError(400, 800002, f"Invalid request input: size {raw!r} is not a number.") from None
    if size < 0:
        raise ApiError(400, 800002, "Invalid request input: size must not be negative.")
    return min(size or DEFAULT_PAGE, MAX_PAGE)


def _paged(
    state: SandboxState, request: Request, kind: str, base_uri: str,
    fetch: Callable[[int, int], tuple[list[dict[str, Any]], int | None]], *, ends_in_2000: bool = False,
) -> dict[str, Any]:
    q = _query(request)
    size = _page_size(q)
    seek = q.get("seekoperation")
    token = request.headers.get("ms-continuationtoken")
    offset = 0
    if seek is not None and seek.lower() not in ("next", "first"):
        raise ApiError(400, 800002, f"Invalid request input: seekOperation {seek!r} is not supported.")
    if seek is not None and seek.lower() == "next":
        if not token:
            raise ApiError(400, 800002, "Invalid request input: MS-ContinuationToken header is required.")
        offset = state.read_token(kind, token)
    elif token and seek is None:
        offset = state.read_token(kind, token)
    items, nxt = fetch(offset, size)
    if ends_in_2000:
        # The last page may still carry a continuation; following it answers 400 code 2000, which Microsoft's
        # bulk migration tool reads as "fetched all the records" (get-a-list-of-customers; BAM CustomerProvider.cs).
        if offset > 0 and not items:
            raise ApiError(400, 2000, "No more records are available for this continuation token.")
        if nxt is None and items:
            nxt = offset + len(items)
    out = _collection(items, f"{base_uri}?size={size}")
    if nxt is not None:
        tok = state.make_token(kind, nxt)
        out["links"]["next"] = link(
            _next_uri(state.config, request, f"{base_uri}?size={size}&seekOperation=Next"),
            headers=[{"key": "MS-ContinuationToken", "value": tok}],
        )
        out["continuationToken"] = tok
    return out


def _next_uri(config: SandboxConfig, request: Request, relative: str) -> str:
    """The documented relative next link (``/customers?…``), or as ``absolute_next_links`` /
    ``next_link_v1_prefix`` spell it (the SDK calls ``links.next.uri`` "exactly as given")."""
    prefix = config.next_link_v1_prefix or ""
    if config.absolute_next_links:
        return f"{request.url.scheme}://{request.url.netloc}{prefix or '/v1'}{relative}"
    return prefix + relative


Endpoint = Callable[[Request], Awaitable[Response]]


def _api(fn: Callable[[Request], Awaitable[Response]]) -> Endpoint:
    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as err:
            return _json(err.status, err.body())

    return wrapper


def _checkout_answer(config: SandboxConfig, result: dict[str, Any]) -> dict[str, Any]:
    """The CartCheckoutResult, or — ``checkout_answers_bare_order``, as checkout-a-cart's new-commerce example —
    its one Order by itself."""
    orders = result.get("orders") or []
    if config.checkout_answers_bare_order and len(orders) == 1 and not result.get("orderErrors"):
        order: dict[str, Any] = orders[0]
        return order
    return result


def _partner_routes(state: SandboxState, config: SandboxConfig) -> list[Route]:
    def p(request: Request, name: str) -> str:
        return str(request.path_params[name])

    async def customers(request: Request) -> Response:
        return _json(200, _paged(state, request, "customers", "/customers", state.list_customers,
                                 ends_in_2000=config.customer_paging_ends_in_2000))

    async def customer(request: Request) -> Response:
        return _json(200, state.customer_json(p(request, "cid")))

    async def subscriptions(request: Request) -> Response:
        cid = p(request, "cid")
        order_id = _query(request).get("order_id")
        items = state.subscriptions_json(cid, order_id)
        uri = f"/customers/{cid}/subscriptions" + (f"?order_id={order_id}" if order_id else "")
        return _json(200, _collection(items, uri))

    async def subscription(request: Request) -> Response:
        return _json(200, state.subscription_json(p(request, "cid"), p(request, "sid")))

    async def patch_subscription(request: Request) -> Response:
        body = await _body(request)
        cid, sid = p(request, "cid"), p(request, "sid")
        defer = float(config.patch_apply_delay_s) if config.patch_accepted else 0.0
        sub = state.patch_subscription(cid, sid, body, request.headers.get("if-match"), defer_s=defer)
        if sub is None:
            # update-a-subscription-by-id: "when the patch operation takes longer than the expected time, Partner
            # Center sends … 202 … and a location header that points to where to retrieve the subscription".
            return Response(b"", status_code=202,
                            headers={"Location": f"/v1/customers/{cid}/subscriptions/{sid}"})
        return _json(200, sub)

    async def provisioning(request: Request) -> Response:
        return _json(200, state.provisioning_status(p(request, "cid"), p(request, "sid")))

    async def orders(request: Request) -> Response:
        cid = p(request, "cid")
        if request.method == "POST":
            return _json(201, state.create_order(cid, await _body(request)))
        return _json(200, _collection(state.orders_json(cid), f"/customers/{cid}/orders"))

    async def order(request: Request) -> Response:
        return _json(200, state.order_json(p(request, "cid"), p(request, "oid")))

    async def order_provisioning(request: Request) -> Response:
        cid, oid = p(request, "cid"), p(request, "oid")
        items = state.order_provisioning_status(cid, oid)
        return _json(200, _collection(items, f"/customers/{cid}/orders/{oid}/provisioningstatus"))

    async def carts(request: Request) -> Response:
        return _json(201, state.create_cart(p(request, "cid"), await _body(request)))

    async def cart(request: Request) -> Response:
        cid, cart_id = p(request, "cid"), p(request, "cart")
        if request.method == "PUT":
            return _json(200, state.update_cart(cid, cart_id, await _body(request)))
        return _json(200, state.cart_json(cid, cart_id))

    async def checkout(request: Request) -> Response:
        cid = p(request, "cid")
        cart_obj, replay = state.begin_checkout(cid, p(request, "cart"))
        if replay is not None:
            return _json(201, _checkout_answer(config, state.replay_checkout(cid, replay)))
        try:
            if config.checkout_duration_s > 0:
                await asyncio.sleep(float(config.checkout_duration_s))
        except BaseException:
            cart_obj.processing = False
            raise
        return _json(201, _checkout_answer(config, state.finish_checkout(cid, cart_obj)))

    async def users(request: Request) -> Response:
        cid = p(request, "cid")
        state.customer_json(cid)  # 404 for unknown customers
        return _json(200, _paged(state, request, f"users:{cid.lower()}", f"/customers/{cid}/users",
                                 lambda o, s: state.list_users(cid, o, s),
                                 ends_in_2000=config.users_paging_ends_in_2000))

    async def user(request: Request) -> Response:
        return _json(200, state.user_json(p(request, "cid"), p(request, "uid")))

    async def licenses(request: Request) -> Response:
        cid, uid = p(request, "cid"), p(request, "uid")
        items = state.user_licenses_json(cid, uid)
        return _json(200, _collection(items, f"/customers/{cid}/users/{uid}/licenses"))

    async def license_updates(request: Request) -> Response:
        return _json(201, state.license_update(p(request, "cid"), p(request, "uid"), await _body(request)))

    async def subscribed_skus(request: Request) -> Response:
        cid = p(request, "cid")
        return _json(200, _collection(state.subscribed_skus_json(cid), f"/customers/{cid}/subscribedskus"))

    base = "/v1/customers/{cid}"
    return [
        Route("/v1/customers", _api(customers), methods=["GET"]),
        Route(base, _api(customer), methods=["GET"]),
        Route(f"{base}/subscriptions", _api(subscriptions), methods=["GET"]),
        Route(f"{base}/subscriptions/{{sid}}", _api(subscription), methods=["GET"]),
        Route(f"{base}/subscriptions/{{sid}}", _api(patch_subscription), methods=["PATCH"]),
        Route(f"{base}/subscriptions/{{sid}}/provisioningstatus", _api(provisioning), methods=["GET"]),
        Route(f"{base}/orders", _api(orders), methods=["GET", "POST"]),
        Route(f"{base}/orders/{{oid}}", _api(order), methods=["GET"]),
        Route(f"{base}/orders/{{oid}}/provisioningstatus", _api(order_provisioning), methods=["GET"]),
        Route(f"{base}/carts", _api(carts), methods=["POST"]),
        Route(f"{base}/carts/{{cart}}", _api(cart), methods=["GET", "PUT"]),
        Route(f"{base}/carts/{{cart}}/checkout", _api(checkout), methods=["POST"]),
        Route(f"{base}/users", _api(users), methods=["GET"]),
        Route(f"{base}/users/{{uid}}", _api(user), methods=["GET"]),
        Route(f"{base}/users/{{uid}}/licenses", _api(licenses), methods=["GET"]),
        Route(f"{base}/users/{{uid}}/licenseupdates", _api(license_updates), methods=["POST"]),
        Route(f"{base}/subscribedskus", _api(subscribed_skus), methods=["GET"]),
    ]


def _admin_routes(app: SandboxApp) -> list[Route]:
    state, config = app.state, app.config

    async def get_state(request: Request) -> Response:
        return _json(200, state.snapshot())

    async def get_config(request: Request) -> Response:
        return _json(200, config.to_json())

    async def post_config(request: Request) -> Response:
        try:
            patch = json.loads(await request.body() or b"{}")
            if not isinstance(patch, dict):
                raise ValueError("config patch must be an object")
            config.apply_patch(patch)
        except (ValueError, TypeError) as exc:
            return _json(400, {"error": str(exc)})
        return _json(200, config.to_json())

    async def get_requests(request: Request) -> Response:
        return _json(200, {"items": state.requests()})

    async def reset(request: Request) -> Response:
        raw = await request.body()
        params = json.loads(raw) if raw.strip() else {}
        state.reset(customers=params.get("customers"), seed=params.get("seed"), reseed=seed_world)
        app.general.clear()
        app.license.clear()
        return _json(200, {"ok": True, "customers": len(state.customer_ids())})

    async def catalog(request: Request) -> Response:
        return _json(200, product_mapping())

    async def manifest(request: Request) -> Response:
        m = getattr(state, "manifest", None)
        return _json(200, m.to_json() if m is not None else None)

    return [
        Route("/_sandbox/state", get_state, methods=["GET"]),
        Route("/_sandbox/config", get_config, methods=["GET"]),
        Route("/_sandbox/config", post_config, methods=["POST"]),
        Route("/_sandbox/requests", get_requests, methods=["GET"]),
        Route("/_sandbox/reset", reset, methods=["POST"]),
        Route("/_sandbox/catalog", catalog, methods=["GET"]),
        Route("/_sandbox/manifest", manifest, methods=["GET"]),
    ]


class SandboxApp:
    """Outer ASGI layer.

    Order per request: latency -> auth -> throttle -> pre-faults -> dedupe -> route -> post-faults.
    """

    def __init__(self, state: SandboxState, config: SandboxConfig) -> None:
        self.state = state
        self.config = config
        state.config = config
        self.general = SlidingWindow()
        self.license = SlidingWindow()
        self.router = Router(routes=_partner_routes(state, config) + product_routes(state)
                             + transition_routes(state))
        self.admin = Router(routes=_admin_routes(self))
        self.server_id = "1016" + str(secrets.randbelow(10**5)).zfill(5)
        self.long_throttled = 0  # answers given with config.long_retry_after_s
        self.unavailable_answers: dict[str, int] = {}  # customer id -> 503s given (subscriptions_unavailable_*)

    def _customer_refusal(self, segments: list[str], method: str) -> tuple[int, int, str] | None:
        """The error a customer's subscription list (or profile) answers under the ``subscriptions_*_customers``
        (``profile_forbidden_customers``) switches (error codes from
        https://learn.microsoft.com/partner-center/developer/error-codes), or None."""
        if (method == "GET" and len(segments) == 3 and segments[1] == "customers"
                and segments[2] in {x.lower() for x in self.config.profile_forbidden_customers}):
            return 403, 20002, "No commerce relationship between partner and customer."
        if method != "GET" or len(segments) != 4 or segments[1] != "customers" or segments[3] != "subscriptions":
            return None
        cfg, customer = self.config, segments[2]
        if customer in {x.lower() for x in cfg.subscriptions_forbidden_customers}:
            return 403, 20002, "No commerce relationship between partner and customer."
        if customer in {x.lower() for x in cfg.subscriptions_missing_customers}:
            return 404, 60003, "Tenant not found."
        if customer in {x.lower() for x in cfg.subscriptions_unavailable_customers}:
            given = self.unavailable_answers.get(customer, 0)
            if not cfg.subscriptions_unavailable_times or given < cfg.subscriptions_unavailable_times:
                self.unavailable_answers[customer] = given + 1
                return 503, 800003, "The service is temporarily unavailable. Try again later."
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        path: str = scope["path"]
        method: str = scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("ms-requestid") or str(uuid.uuid4())
        correlation_id = headers.get("ms-correlationid") or str(uuid.uuid4())
        started = time.time()
        echo = [
            (b"ms-requestid", request_id.encode()),
            (b"ms-correlationid", correlation_id.encode()),
            (b"ms-cv", (secrets.token_urlsafe(16) + ".0").encode()),
            (b"ms-serverid", self.server_id.encode()),
        ]
        log: dict[str, Any] = {
            "method": method, "path": path, "query": scope.get("query_string", b"").decode("latin-1"),
            "requestId": request_id, "correlationId": correlation_id, "time": started, "status": None,
            "fault": None,
        }

        async def replay_body() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def respond(status: int, payload: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
            hdrs = [(b"content-type", JSON_CT.encode()), (b"content-length", str(len(payload)).encode())]
            hdrs += echo + (extra or [])
            await send({"type": "http.response.start", "status": status, "headers": hdrs})
            await send({"type": "http.response.body", "body": payload})
            log["status"] = status

        async def drop() -> None:
            # Start a response, then return without a body: uvicorn closes the connection mid-response.
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-length", b"4096"), (b"content-type", JSON_CT.encode())]})
            log["status"] = 0

        def err(status: int, code: int, description: str) -> bytes:
            return json.dumps(ApiError(status, code, description).body()).encode()

        if path.startswith("/_sandbox/"):
            await self.admin(scope, replay_body, send)
            return
        cfg, faults = self.config, self.config.faults
        try:
            if cfg.latency_ms:
                await asyncio.sleep(float(cfg.latency_ms) / 1000.0)
            segments = [s.lower() for s in path.strip("/").split("/")]
            if segments and segments[0] == "v1.0":  # the Partner API host's price sheet (get-a-price-sheet)
                query = {k.lower(): v for k, v in parse_qsl(log["query"])}
                answer = handle_price_sheet(path.lower(), query, headers, cfg, datetime.now(UTC))
                if answer is not None:
                    sheet_status, sheet_headers, sheet = answer
                    await send({"type": "http.response.start", "status": sheet_status,
                                "headers": [(b"content-length", str(len(sheet)).encode()), *sheet_headers, *echo]})
                    await send({"type": "http.response.body", "body": sheet})
                    log["status"] = sheet_status
                    return
            if not segments or segments[0] != "v1":
                await respond(404, err(404, 1000, f"Resource {path} not found."))
                return
            is_license_route = len(segments) >= 4 and segments[1] == "customers" and segments[3] in (
                "users", "subscribedskus")
            app_user_only = is_license_route or segments[-1] == "provisioningstatus"
            # --- auth
            if cfg.require_auth:
                auth = headers.get("authorization", "")
                if not auth.lower().startswith("bearer ") or not auth[7:].strip():
                    await respond(401, err(401, 800001, "Partner Token missing in request context."),
                                  [(b"www-authenticate", b'Bearer error="invalid_token"')])
                    return
                if app_user_only and is_app_only(auth[7:].strip()):
                    if segments[-1] == "licenseupdates":
                        await respond(400, err(400, 900316, "Partner token is not allowed in license management "
                                                            "calls. Please call with Partner Access Token."))
                    else:
                        await respond(403, err(403, 900329,
                                               "This resource does not support application-only authentication."))
                    return
            if cfg.require_auth and cfg.require_mfa_claim:
                payload = jwt_payload(headers.get("authorization", "")[7:].strip()) or {}
                if not is_app_only(headers.get("authorization", "")[7:].strip()) and "mfa" not in (
                        payload.get("amr") or []):
                    await respond(401, err(401, 900421, "MFA required: the App+User token has no MFA claim."),
                                  [(b"www-authenticate", b'Bearer error="invalid_token"')])
                    return
            # --- per-customer access problems (GDAP roles, MFA, Conditional Access)
            customer = segments[2] if len(segments) >= 3 and segments[1] == "customers" else ""
            if customer and app_user_only and customer in {x.lower() for x in cfg.gdap_missing_roles_customers}:
                # error-codes: 403 900308; the operation pages list the GDAP roles each call needs.
                await respond(403, err(403, 900308, "Insufficient privileges to complete the operation."))
                return
            if customer and segments[-1] == "licenseupdates":
                if customer in {x.lower() for x in cfg.mfa_missing_customers}:
                    await respond(401, err(401, 900421, "MFA required: the App+User token has no MFA claim."),
                                  [(b"www-authenticate", b'Bearer error="invalid_token"')])
                    return
                if customer in {x.lower() for x in cfg.conditional_access_customers}:
                    await respond(403, err(403, 900309, "Access has been blocked by Conditional Access policies. "
                                                        "The access policy does not allow token issuance."))
                    return
            refusal = self._customer_refusal(segments, method)
            if refusal is not None:
                log["fault"] = "subscriptions-" + str(refusal[0])
                await respond(refusal[0], err(*refusal))
                return
            if (cfg.long_retry_after_s and cfg.long_retry_after_path and cfg.long_retry_after_path.lower()
                    in path.lower() and self.long_throttled < cfg.long_retry_after_times):
                self.long_throttled += 1
                wait = int(cfg.long_retry_after_s)
                payload_429 = {"statusCode": 429, "message": f"Rate limit is exceeded. Try again in {wait} seconds."}
                log["fault"] = "long-retry-after"
                await respond(429, json.dumps(payload_429).encode(), [(b"retry-after", str(wait).encode())])
                return
            # --- throttling
            window, limit = (
                (self.license, cfg.license_requests_per_minute) if is_license_route
                else (self.general, cfg.requests_per_minute)
            )
            retry_after = window.hit(time.monotonic(), limit)
            if retry_after is not None:
                payload = {"statusCode": 429, "message": f"Rate limit is exceeded. Try again in {retry_after} seconds."}
                await respond(429, json.dumps(payload).encode(), [(b"retry-after", str(retry_after).encode())])
                return
            # --- pre-action faults
            rng = faults.rng
            if faults.reset_rate and rng.random() < faults.reset_rate:
                log["fault"] = "reset"
                await drop()
                return
            if faults.timeout_rate and rng.random() < faults.timeout_rate:
                log["fault"] = "timeout"
                await asyncio.sleep(float(faults.timeout_s))
            if faults.error_rate and rng.random() < faults.error_rate:
                log["fault"] = "error"
                wait = int(faults.error_retry_after_s or 0)
                later = [(b"retry-after", str(wait).encode())] if wait > 0 else None
                if rng.random() < 0.5:
                    await respond(500, err(500, 800003, "Unexpected service error."), later)
                else:
                    await respond(503, err(503, 800003, "The service is temporarily unavailable. Try again later."),
                                  later)
                return
            # --- MS-RequestId dedupe (undocumented in the real service; opt-in)
            if cfg.dedupe_request_ids and method == "POST" and headers.get("ms-requestid"):
                stored = self.state.dedupe_get(request_id)
                if stored is not None:
                    log["fault"] = "dedupe-replay"
                    await respond(stored[0], stored[1], stored[2])
                    return
            # --- route
            self.state.tick()
            inner_scope = dict(scope)
            inner_scope["path"] = "/" + "/".join(segments)
            inner_scope["raw_path"] = inner_scope["path"].encode()
            captured: dict[str, Any] = {"status": 500, "headers": [], "body": b""}

            async def capture(message: Message) -> None:
                if message["type"] == "http.response.start":
                    captured["status"] = message["status"]
                    captured["headers"] = [
                        (k, v) for k, v in message.get("headers", [])
                        if k.lower() not in (b"content-length", b"content-type")
                    ]
                elif message["type"] == "http.response.body":
                    captured["body"] += message.get("body", b"")

            await self.router(inner_scope, replay_body, capture)
            status, resp_body, resp_headers = captured["status"], captured["body"], captured["headers"]
            if status == 404 and not resp_body.strip().startswith(b"{"):
                resp_body = err(404, 1000, f"Resource {path} not found.")
            elif status == 405:
                resp_body = err(405, 1000, f"Method {method} not allowed on {path}.")
            if cfg.dedupe_request_ids and method == "POST" and headers.get("ms-requestid") and status < 500:
                self.state.dedupe_put(request_id, (status, resp_body, resp_headers))
            # --- post-action faults (the write was applied; the client never learns the result)
            if method in WRITE_METHODS and status < 400:
                lose = False
                if faults.lose_first_write_response:
                    key = hashlib.sha256(method.encode() + inner_scope["path"].encode() + b"\n" + body).hexdigest()
                    lose = self.state.first_time_write(key)
                if not lose and faults.lose_response_rate and rng.random() < faults.lose_response_rate:
                    lose = True
                if lose:
                    log["fault"] = f"lost-response:{status}"
                    if rng.random() < 0.5:
                        await respond(500, err(500, 800003, "Unexpected service error."))
                    else:
                        await drop()
                    return
            await respond(status, resp_body, resp_headers)
        finally:
            log["duration_ms"] = round((time.time() - started) * 1000, 2)
            self.state.log_request(log)


def create_app(state: SandboxState, config: SandboxConfig | None = None) -> SandboxApp:
    """The sandbox ASGI app serving Partner Center `/v1/...` routes plus `/_sandbox/...` admin routes."""
    return SandboxApp(state, config or SandboxConfig())
