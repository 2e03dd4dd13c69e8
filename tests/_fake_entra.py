"""A fake Microsoft identity platform (Entra ID v2.0) token service for tests, served over TLS on 127.0.0.1.

msal 1.39 only accepts ``https://host/tenant`` authorities (``msal.authority.canonicalize``) and fetches
``{authority}/v2.0/.well-known/openid-configuration`` before anything else, so this serves HTTPS with a throwaway
self-signed certificate generated at start-up; clients trust it through a ``requests.Session`` whose ``verify``
points at that certificate (TLS verification stays on). Pass ``instance_discovery=False`` to msal, or it asks
login.microsoftonline.com about the unknown host.

Endpoints (``{tenant}`` must be the configured tenant id):

* ``GET  /{tenant}/v2.0/.well-known/openid-configuration``
* ``POST /{tenant}/oauth2/v2.0/devicecode``
* ``POST /{tenant}/oauth2/v2.0/token`` with ``grant_type`` ``refresh_token`` or
  ``urn:ietf:params:oauth:grant-type:device_code``

Behaviour worth knowing:

* Every refresh-token redemption returns a NEW refresh token and invalidates the old one (stricter than Entra,
  which lets the old one live until it expires; strict makes lost write-backs visible).
* Refresh tokens remember whether they were issued to a confidential client (client secret presented) or a public
  one; redeeming the wrong way fails like Entra does (``AADSTS700025`` / ``AADSTS7000218``).
* ``fail_refresh_with("AADSTS700082")`` (expired) or ``("AADSTS50076")`` (MFA required) makes redemptions fail.
* ``calls`` counts requests per endpoint/grant. ``issued_secrets()`` lists every token value handed out, for
  leak checks.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import secrets
import ssl
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

PARTNER_CENTER_AUDIENCE = "https://api.partnercenter.microsoft.com"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

ERRORS: dict[str, tuple[str, str]] = {
    "AADSTS700082": ("invalid_grant", "The refresh token has expired due to inactivity. The token was issued on "
                                      "2026-08-01T00:00:00Z and was inactive for 90.00:00:00."),
    "AADSTS50076": ("invalid_grant", "Due to a configuration change made by your administrator, or because you "
                                     "moved to a new location, you must use multi-factor authentication to access "
                                     f"'{PARTNER_CENTER_AUDIENCE}'."),
    "AADSTS70000": ("invalid_grant", "Provided grant is invalid or malformed."),
    "AADSTS65001": ("invalid_grant", "The user or administrator has not consented to use the application."),
    "AADSTS7000215": ("invalid_client", "Invalid client secret provided. Ensure the secret being sent in the "
                                        "request is the client secret value, not the client secret ID."),
    "AADSTS7000218": ("invalid_client", "The request body must contain the following parameter: 'client_assertion' "
                                        "or 'client_secret'."),
    "AADSTS700025": ("invalid_client", "Client is public so neither 'client_assertion' nor 'client_secret' should "
                                       "be presented."),
    "AADSTS70016": ("authorization_pending", "OAuth 2.0 device flow error. Authorization is pending. Continue "
                                             "polling."),
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(claims: dict[str, Any]) -> str:
    """A JWT-shaped token (random signature; nobody verifies it here)."""
    header = {"typ": "JWT", "alg": "RS256", "kid": "fake-entra-key"}
    return ".".join((_b64url(json.dumps(header).encode()), _b64url(json.dumps(claims).encode()),
                     _b64url(secrets.token_bytes(64))))


def decode_jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def generate_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway CA-style self-signed certificate for 127.0.0.1/localhost. Returns (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-entra test certificate")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "fake-entra-cert.pem", directory / "fake-entra-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class _RefreshGrant:
    user: str
    confidential: bool
    mfa: bool


@dataclass
class _DeviceCode:
    user_code: str
    scope: str
    polls: int = 0
    redeemed: bool = False


@dataclass
class FakeEntra:
    """Start with :meth:`start` (or use as a context manager); ``authority`` is what msal gets."""

    tenant_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    client_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    client_secret: str = field(default_factory=lambda: "fake~" + secrets.token_urlsafe(30), repr=False)
    user: str = "svc-partnercenter@contoso-partner.example"
    access_token_lifetime: int = 3599
    #: Device-code polls answered ``authorization_pending`` before the sign-in "completes".
    pending_polls: int = 0
    #: Whether the simulated sign-in satisfied MFA (the ``amr`` claim).
    mfa: bool = True
    calls: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._refresh_tokens: dict[str, _RefreshGrant] = {}
        self._retired: set[str] = set()
        self._device_codes: dict[str, _DeviceCode] = {}
        self._issued: list[str] = []
        self._refresh_failure: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.cert_path: Path | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> FakeEntra:
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-entra-")
        self.cert_path, key_path = generate_self_signed_cert(Path(self._tmp.name))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, key_path)
        handler = _make_handler(self)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-entra", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> FakeEntra:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def authority(self) -> str:
        """The value for ``PARTNER_CENTER_AUTHORITY`` (without the tenant)."""
        return self.base_url

    @property
    def token_endpoint(self) -> str:
        return f"{self.base_url}/{self.tenant_id}/oauth2/v2.0/token"

    def http_session(self) -> Any:
        """A ``requests.Session`` that trusts this server's certificate (and nothing else changes)."""
        import requests

        session = requests.Session()
        session.verify = str(self.cert_path)
        # requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override ``session.verify``; ignore the environment so
        # the throwaway certificate is what gets trusted (verification stays on; proxies don't matter on loopback).
        session.trust_env = False
        return session

    # -- test controls ---------------------------------------------------------------------------------------

    def issue_refresh_token(self, *, confidential: bool = True, mfa: bool = True) -> str:
        """Mint a valid refresh token directly (as if a consent had happened)."""
        with self._lock:
            return self._new_refresh_token(confidential=confidential, mfa=mfa)

    def is_valid_refresh_token(self, value: str) -> bool:
        with self._lock:
            return value in self._refresh_tokens

    def fail_refresh_with(self, code: str | None) -> None:
        """Make every refresh-token redemption fail with this AADSTS code (``None`` to stop)."""
        self._refresh_failure = code

    def issued_secrets(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    # -- token minting (call with the lock held) -------------------------------------------------------------

    def _new_refresh_token(self, *, confidential: bool, mfa: bool) -> str:
        value = "1.AR" + secrets.token_urlsafe(48)
        self._refresh_tokens[value] = _RefreshGrant(self.user, confidential, mfa)
        self._issued.append(value)
        return value

    def _token_response(self, grant: _RefreshGrant, scope: str) -> dict[str, Any]:
        now = int(time.time())
        oid = str(uuid.uuid5(uuid.NAMESPACE_URL, grant.user))
        access = make_jwt({
            "aud": PARTNER_CENTER_AUDIENCE, "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now, "nbf": now, "exp": now + self.access_token_lifetime, "tid": self.tenant_id, "oid": oid,
            "appid": self.client_id, "upn": grant.user, "scp": "user_impersonation",
            "amr": ["pwd", "mfa"] if grant.mfa else ["pwd"], "ver": "1.0",
        })
        id_token = make_jwt({
            "aud": self.client_id, "iss": f"{self.base_url}/{self.tenant_id}/v2.0", "iat": now, "nbf": now,
            "exp": now + 3600, "tid": self.tenant_id, "oid": oid, "sub": oid, "preferred_username": grant.user,
            "name": "Partner Center service account", "ver": "2.0",
        })
        refresh = self._new_refresh_token(confidential=grant.confidential, mfa=grant.mfa)
        self._issued.extend((access, id_token))
        client_info = _b64url(json.dumps({"uid": oid, "utid": self.tenant_id}).encode())
        scopes = [s for s in scope.split() if s.startswith(PARTNER_CENTER_AUDIENCE)]
        return {
            "token_type": "Bearer",
            "scope": f"{PARTNER_CENTER_AUDIENCE}/user_impersonation" if scopes else "",
            "expires_in": self.access_token_lifetime,
            "ext_expires_in": self.access_token_lifetime,
            "access_token": access,
            "refresh_token": refresh,
            "id_token": id_token,
            "client_info": client_info,
        }

    # -- request handling ------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        parts = [p for p in urlsplit(path).path.split("/") if p]
        if not parts or parts[0] != self.tenant_id:
            return 400, self._error("invalid_tenant", "AADSTS90002",
                                    f"Tenant '{parts[0] if parts else ''}' not found.")
        rest = "/".join(parts[1:])
        if method == "GET" and rest == "v2.0/.well-known/openid-configuration":
            self.calls["discovery"] += 1
            return 200, self._openid_configuration()
        if method == "POST" and rest == "oauth2/v2.0/devicecode":
            self.calls["devicecode"] += 1
            return self._device_code(form)
        if method == "POST" and rest == "oauth2/v2.0/token":
            grant_type = form.get("grant_type", "")
            self.calls[f"token:{grant_type}"] += 1
            if grant_type == "refresh_token":
                return self._redeem_refresh_token(form)
            if grant_type == DEVICE_CODE_GRANT:
                return self._redeem_device_code(form)
            return 400, self._error("unsupported_grant_type", "AADSTS70003", "The app requested an unsupported "
                                    "grant type.")
        return 404, {"error": "not_found"}

    def _openid_configuration(self) -> dict[str, Any]:
        base = f"{self.base_url}/{self.tenant_id}"
        return {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "jwks_uri": f"{self.base_url}/{self.tenant_id}/discovery/v2.0/keys",
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "tenant_region_scope": "EU",
        }

    def _error(self, error: str, code: str, description: str, status_hint: int = 400) -> dict[str, Any]:
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return {
            "error": error,
            "error_description": f"{code}: {description} Trace ID: {trace} Correlation ID: {correlation} "
                                 f"Timestamp: {stamp}",
            "error_codes": [int(code.removeprefix("AADSTS"))],
            "timestamp": stamp, "trace_id": trace, "correlation_id": correlation,
        }

    def _known_error(self, code: str) -> tuple[int, dict[str, Any]]:
        error, description = ERRORS[code]
        status = 401 if error == "invalid_client" else 400
        body = self._error(error, code, description)
        if code == "AADSTS50076":
            body["suberror"] = "basic_action"
            body["claims"] = '{"access_token":{"capolids":{"essential":true,"values":["fake"]}}}'
        return status, body

    def _check_client(self, form: dict[str, str], *, confidential: bool) -> tuple[int, dict[str, Any]] | None:
        if form.get("client_id") != self.client_id:
            return 400, self._error("unauthorized_client", "AADSTS700016", f"Application with identifier "
                                    f"'{form.get('client_id')}' was not found in the directory.")
        secret = form.get("client_secret")
        if confidential and secret is None:
            return self._known_error("AADSTS7000218")
        if not confidential and secret is not None:
            return self._known_error("AADSTS700025")
        if secret is not None and not secrets.compare_digest(secret, self.client_secret):
            return self._known_error("AADSTS7000215")
        return None

    def _redeem_refresh_token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            value = form.get("refresh_token", "")
            grant = self._refresh_tokens.get(value)
            if grant is None:
                return self._known_error("AADSTS70000" if value not in self._retired else "AADSTS700082")
            problem = self._check_client(form, confidential=grant.confidential)
            if problem is not None:
                return problem
            if self._refresh_failure is not None:
                return self._known_error(self._refresh_failure)
            del self._refresh_tokens[value]  # rotation: the old refresh token stops working
            self._retired.add(value)
            return 200, self._token_response(grant, form.get("scope", ""))

    def _device_code(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != self.client_id:
            return 400, self._error("unauthorized_client", "AADSTS700016", "Application not found.")
        device_code = "DAQABAAEAAA" + secrets.token_urlsafe(40)
        user_code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(9))
        with self._lock:
            self._device_codes[device_code] = _DeviceCode(user_code, form.get("scope", ""))
            self._issued.append(device_code)
        uri = "https://microsoft.com/devicelogin"
        return 200, {
            "user_code": user_code, "device_code": device_code, "verification_uri": uri, "expires_in": 900,
            "interval": 1,
            "message": f"To sign in, use a web browser to open the page {uri} and enter the code {user_code} to "
                       "authenticate.",
        }

    def _redeem_device_code(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            entry = self._device_codes.get(form.get("device_code", ""))
            if entry is None or entry.redeemed:
                return 400, self._error("expired_token", "AADSTS70020", "The provided value for the input "
                                        "parameter 'device_code' is not valid.")
            confidential = "client_secret" in form
            problem = self._check_client(form, confidential=confidential)
            if problem is not None:
                return problem
            entry.polls += 1
            if entry.polls <= self.pending_polls:
                return self._known_error("AADSTS70016")
            entry.redeemed = True
            body = self._token_response(_RefreshGrant(self.user, confidential, self.mfa), entry.scope)
            if "offline_access" not in entry.scope.split():  # the scope was sent with the devicecode request
                self._refresh_tokens.pop(body.pop("refresh_token"), None)
            return 200, body


def _make_handler(fake: FakeEntra) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _respond(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Cache-Control", "no-store, no-cache")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            status, body = fake.handle("GET", self.path, {})
            self._respond(status, body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode("utf-8") if length else ""
            form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
            status, body = fake.handle("POST", self.path, form)
            self._respond(status, body)

    return Handler
