"""Partner Center access tokens for an unattended app: App+User via the Secure Application Model.

How it fits together:

* A partner service account (Admin Agent, MFA-enabled) signs in once with ``python -m d365_migration consent``
  (see :mod:`d365_migration._consent`). That stores a **refresh token** in Key Vault.
* At run time :class:`AppUserCredential` redeems the refresh token for a Partner Center access token
  (audience ``https://api.partnercenter.microsoft.com``) with the app registration's client secret, caches the
  access token until shortly before it expires, and writes the **rotated** refresh token that each redemption
  returns back to the store, so the 90-day clock restarts at every use.
* When the stored refresh token is more than 60 days old (i.e. rotation is not being persisted) it logs a
  WARNING with the marker ``event=refresh_token_expiring``; when a redemption is refused (expired, revoked, MFA
  required, consent missing…) it logs ERROR ``event=auth_failed`` and raises :class:`AuthenticationError` whose
  message says to run ``python -m d365_migration consent``. Later calls then fail fast instead of hammering Entra.

No token, secret or refresh token ever goes into a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from ._exceptions import AuthenticationError, ConfigurationError

if TYPE_CHECKING:
    from ._settings import Settings

__all__ = [
    "CLIENT_SECRET_NAME",
    "CONSENT_COMMAND",
    "DEFAULT_SECRET_NAME",
    "PARTNER_CENTER_AUDIENCE",
    "PARTNER_CENTER_SCOPE",
    "AccessTokenSource",
    "AppUserCredential",
    "KeyVaultRefreshTokenStore",
    "MemoryRefreshTokenStore",
    "RefreshTokenStore",
    "RefreshTokenStoreError",
    "StaticRefreshTokenStore",
    "StoredRefreshToken",
    "TokenExchangeError",
    "authority_url",
    "build_credential",
    "build_refresh_token_store",
    "is_unresolved_key_vault_reference",
    "redact",
    "require_app_user_settings",
]

logger = logging.getLogger(__name__)

_JSON_CREDENTIAL = re.compile(r'("(?:device_code|code|refresh_token|access_token|id_token|client_secret|assertion)"'
                              r'\s*:\s*)"[^"]*"')


class _RedactingFilter(logging.Filter):
    """Belt and braces for msal's DEBUG dumps (which, e.g., include the device code verbatim)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a broken record: leave it to logging's own error handling
            return True
        cleaned = redact(_JSON_CREDENTIAL.sub(r'\1"***"', text))
        if cleaned != text:
            record.msg, record.args = cleaned, None
        return True


# msal logs request details at DEBUG/INFO; keep it to warnings and above, and scrub what it dumps if someone turns
# it up anyway (a filter only sees records logged on its own logger, hence the explicit child loggers).
logging.getLogger("msal").setLevel(logging.WARNING)
for _name in ("msal", "msal.application", "msal.token_cache", "msal.authority", "msal.telemetry", "msal.region",
              "msal.managed_identity", "msal.wstrust_request", "msal.mex", "msal.cloudshell", "msal.oauth2cli.oauth2",
              "msal.oauth2cli.oidc", "msal.oauth2cli.authcode", "msal.oauth2cli.assertion"):
    logging.getLogger(_name).addFilter(_RedactingFilter())

PARTNER_CENTER_AUDIENCE = "https://api.partnercenter.microsoft.com"
PARTNER_CENTER_SCOPE = f"{PARTNER_CENTER_AUDIENCE}/.default"
CONSENT_COMMAND = "python -m d365_migration consent"
DEFAULT_SECRET_NAME = "partner-center-refresh-token"
CLIENT_SECRET_NAME = "partner-center-client-secret"
REFRESH_TOKEN_LIFETIME = timedelta(days=90)
REFRESH_TOKEN_WARN_AGE = timedelta(days=60)

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_AADSTS = re.compile(r"AADSTS(\d+)")


def redact(text: str, secrets: Sequence[str | None] = ()) -> str:
    """Replace every known secret value and anything JWT-shaped in ``text`` with ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _JWT.sub("***", text)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Errors


class RefreshTokenStoreError(AuthenticationError):
    """The refresh token store could not be read or written. The message says what to fix."""


class TokenExchangeError(AuthenticationError):
    """Entra refused or failed to redeem the refresh token.

    ``error`` is the OAuth error (``invalid_grant``…), ``aadsts`` the Entra code (``AADSTS700082``…).
    ``transient`` errors (network, Entra 5xx, ``temporarily_unavailable``) are not remembered: the next call tries
    again. Permanent ones make later calls fail fast.
    """

    def __init__(self, message: str, *, error: str | None = None, aadsts: str | None = None,
                 transient: bool = False) -> None:
        super().__init__(message)
        self.error = error
        self.aadsts = aadsts
        self.transient = transient

    def copy(self) -> TokenExchangeError:
        return TokenExchangeError(str(self), error=self.error, aadsts=self.aadsts, transient=self.transient)


# ---------------------------------------------------------------------------------------------------------------
# Protocols


@runtime_checkable
class AccessTokenSource(Protocol):
    """What the Partner Center client needs: a bearer token, and a way to release resources."""

    async def get_token(self, *, force_refresh: bool = False) -> str:
        """A bearer access token for Partner Center. ``force_refresh=True`` after a 401 gets a new one."""
        ...

    async def aclose(self) -> None:
        ...


@dataclass(frozen=True)
class StoredRefreshToken:
    value: str = field(repr=False)
    #: When this refresh token was issued (stored); ``None`` when unknown.
    issued_at: datetime | None = None


class RefreshTokenStore(Protocol):
    """Where the partner service account's refresh token lives. Both methods are blocking (run in a thread)."""

    def load(self) -> StoredRefreshToken:
        """The current refresh token. Raises :class:`RefreshTokenStoreError` when there is none / it can't be read."""
        ...

    def save(self, value: str) -> None:
        """Store a new (rotated) refresh token. Raises on failure."""
        ...


# ---------------------------------------------------------------------------------------------------------------
# Stores


class MemoryRefreshTokenStore:
    """In-memory store, for tests and demos. ``saves`` counts the writes."""

    def __init__(self, value: str | None = None, *, issued_at: datetime | None = None,
                 now: Callable[[], datetime] | None = None) -> None:
        self._now = now or (lambda: datetime.now(UTC))
        self._value = value
        self._issued_at = issued_at if issued_at is not None or value is None else self._now()
        self.saves = 0
        self.fail_saves = False

    def __repr__(self) -> str:
        return f"MemoryRefreshTokenStore(has_value={self._value is not None}, saves={self.saves})"

    def load(self) -> StoredRefreshToken:
        if self._value is None:
            raise RefreshTokenStoreError(f"no refresh token has been stored yet — run {CONSENT_COMMAND}")
        return StoredRefreshToken(self._value, self._issued_at)

    def save(self, value: str) -> None:
        if self.fail_saves:
            raise RefreshTokenStoreError("memory store configured to fail writes")
        self._value = value
        self._issued_at = self._now()
        self.saves += 1

    @property
    def value(self) -> str | None:
        return self._value


class StaticRefreshTokenStore:
    """The refresh token from the ``PARTNER_CENTER_REFRESH_TOKEN`` app setting (in Azure a Key Vault reference,
    so the value arrives resolved). It cannot be written back: a rotated token lives only in this process.
    Use ``KEY_VAULT_URL`` (→ :class:`KeyVaultRefreshTokenStore`) to persist rotation."""

    def __init__(self, value: str, *, issued_at: datetime | None = None) -> None:
        if not value:
            raise ConfigurationError("PARTNER_CENTER_REFRESH_TOKEN", "is empty", f"run {CONSENT_COMMAND}")
        self._token = StoredRefreshToken(value, issued_at)

    def __repr__(self) -> str:
        return "StaticRefreshTokenStore()"

    def load(self) -> StoredRefreshToken:
        return self._token

    def save(self, value: str) -> None:
        raise RefreshTokenStoreError(
            "PARTNER_CENTER_REFRESH_TOKEN is an app setting and cannot be updated from the app; the rotated token "
            "is kept in memory only — set KEY_VAULT_URL so rotation is persisted")


class KeyVaultRefreshTokenStore:
    """The refresh token as a Key Vault secret (one new secret version per rotation).

    The app's identity (``DefaultAzureCredential``: managed identity in Azure, your ``az login`` locally) needs
    ``get`` and ``set`` on secrets: the *Key Vault Secrets Officer* role on the vault (RBAC vaults) or an access
    policy with Get+Set. ``issued_at`` is the secret version's ``created_on``.
    """

    def __init__(self, vault_url: str, *, secret_name: str = DEFAULT_SECRET_NAME, credential: Any = None,
                 client: Any = None) -> None:
        self.vault_url = vault_url
        self.secret_name = secret_name
        self._owns_credential = False
        self._credential = credential
        if client is None:
            from azure.keyvault.secrets import SecretClient

            if credential is None:
                from azure.identity import DefaultAzureCredential

                self._credential = DefaultAzureCredential()
                self._owns_credential = True
            client = SecretClient(vault_url=vault_url, credential=self._credential)
        self._client = client

    def __repr__(self) -> str:
        return f"KeyVaultRefreshTokenStore({self.vault_url!r}, secret_name={self.secret_name!r})"

    def _where(self) -> str:
        return f"Key Vault secret {self.secret_name!r} in {self.vault_url}"

    def _explain(self, exc: Exception, verb: str) -> RefreshTokenStoreError:
        from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

        if isinstance(exc, ResourceNotFoundError):
            return RefreshTokenStoreError(f"{self._where()} does not exist — run {CONSENT_COMMAND} to sign in and "
                                          "store a refresh token")
        if isinstance(exc, ClientAuthenticationError):
            return RefreshTokenStoreError(
                f"could not {verb} {self._where()}: the app's identity could not authenticate to Key Vault "
                f"({type(exc).__name__}) — check the managed identity (in Azure) or `az login` (locally)")
        if isinstance(exc, HttpResponseError) and exc.status_code == 403:
            return RefreshTokenStoreError(
                f"could not {verb} {self._where()}: access denied — give the app's identity the "
                "'Key Vault Secrets Officer' role on the vault (or a Get+Set secrets access policy)")
        status = getattr(exc, "status_code", None)
        return RefreshTokenStoreError(f"could not {verb} {self._where()}: {type(exc).__name__}"
                                      + (f" (HTTP {status})" if status else ""))

    def load(self) -> StoredRefreshToken:
        try:
            secret = self._client.get_secret(self.secret_name)
        except Exception as exc:
            raise self._explain(exc, "read") from None
        if not secret.value:
            raise RefreshTokenStoreError(f"{self._where()} is empty — run {CONSENT_COMMAND}")
        created = getattr(secret.properties, "created_on", None)
        return StoredRefreshToken(secret.value, created)

    def save(self, value: str) -> None:
        now = datetime.now(UTC)
        self.put(value, content_type="application/vnd.partnercenter.refresh-token",
                 tags={"issuedAt": now.isoformat(timespec="seconds"),
                       "expectedExpiry": (now + REFRESH_TOKEN_LIFETIME).isoformat(timespec="seconds")})

    def put(self, value: str, *, content_type: str = "text/plain", tags: dict[str, str] | None = None) -> None:
        """Write a new version of the secret (used by :meth:`save`, and by consent for the client secret)."""
        try:
            self._client.set_secret(self.secret_name, value, content_type=content_type,
                                    tags={"writtenBy": "d365_migration", **(tags or {})})
        except Exception as exc:
            raise self._explain(exc, "write") from None

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if callable(close):
            close()
        if self._owns_credential:
            cred_close = getattr(self._credential, "close", None)
            if callable(cred_close):
                cred_close()


# ---------------------------------------------------------------------------------------------------------------
# Explaining Entra errors

_REASONS: dict[str, str] = {
    "AADSTS700082": "the refresh token has expired (not used for 90 days)",
    "AADSTS70008": "the refresh token has expired or been revoked",
    "AADSTS70043": "the refresh token has expired because of a Conditional Access sign-in frequency policy",
    "AADSTS700084": "the refresh token has expired",
    "AADSTS50173": "the refresh token was revoked (the account's password changed or its sessions were revoked)",
    "AADSTS50133": "the session is invalid because the account's password changed",
    "AADSTS50076": "multi-factor authentication is required",
    "AADSTS50079": "the account must register for multi-factor authentication",
    "AADSTS50074": "multi-factor authentication is required",
    "AADSTS50158": "an external security challenge (MFA) is required",
    "AADSTS53003": "access was blocked by a Conditional Access policy",
    "AADSTS65001": "the user or an administrator has not consented to the application",
    "AADSTS50057": "the signed-in account is disabled",
    "AADSTS50055": "the signed-in account's password has expired",
    "AADSTS50126": "invalid credentials",
    "AADSTS7000215": "the client secret is wrong",
    "AADSTS7000222": "the client secret has expired",
    "AADSTS700016": "the application (client id) was not found in the tenant",
    "AADSTS700025": "the refresh token was issued to a public client and cannot be used with a client secret",
    "AADSTS90002": "the tenant was not found",
}

_CLIENT_SECRET_CODES = {"AADSTS7000215", "AADSTS7000222"}
_TRANSIENT_ERRORS = {"temporarily_unavailable", "server_error"}


def _aadsts(result: dict[str, Any]) -> str | None:
    codes = result.get("error_codes")
    if isinstance(codes, list) and codes:
        return f"AADSTS{codes[0]}"
    match = _AADSTS.search(str(result.get("error_description", "")))
    return f"AADSTS{match.group(1)}" if match else None


def _fix_for(code: str | None) -> str:
    if code in _CLIENT_SECRET_CODES:
        return ("create a new client secret for the app registration, set PARTNER_CENTER_CLIENT_SECRET to it and "
                "restart the app")
    if code in ("AADSTS700016", "AADSTS90002"):
        return "check PARTNER_CENTER_CLIENT_ID and PARTNER_CENTER_TENANT_ID"
    return (f"run `{CONSENT_COMMAND}` and sign in with the partner's MFA-enabled service account, then restart the "
            "app (or wait a few minutes: it notices the new token)")


def _explain_result(result: dict[str, Any], secrets: Sequence[str | None]) -> TokenExchangeError:
    error = str(result.get("error") or "unknown_error")
    code = _aadsts(result)
    reason = _REASONS.get(code or "", "Entra refused the refresh token")
    description = redact(str(result.get("error_description") or ""), secrets).strip()
    # Entra appends "Trace ID: … Correlation ID: … Timestamp: …"; the trace id is already in ``details``.
    first_line = description.splitlines()[0].split(" Trace ID:")[0][:300] if description else ""
    trace = result.get("trace_id") or result.get("correlation_id")
    details = f"{error}" + (f", {code}" if code else "") + (f", trace id {trace}" if trace else "")
    message = f"Partner Center sign-in failed: {reason} ({details}). Fix: {_fix_for(code)}."
    if first_line:
        message += f" Entra said: {first_line}"
    return TokenExchangeError(message, error=error, aadsts=code, transient=error in _TRANSIENT_ERRORS)


def authority_url(authority: str, tenant_id: str) -> str:
    return f"{authority.rstrip('/')}/{tenant_id}"


# ---------------------------------------------------------------------------------------------------------------
# The credential


@dataclass
class _CachedToken:
    value: str = field(repr=False)
    refresh_at: float  # monotonic clock


class AppUserCredential:
    """App+User access tokens for Partner Center from a stored refresh token (Secure Application Model).

    Safe for concurrent use from one event loop: concurrent callers share one token exchange.

    :param http_client: passed to msal (a ``requests.Session``-like object); tests use it to trust a local CA.
    :param refresh_margin: renew the access token this long before it expires.
    :param transient_backoff: after a transient failure (Entra unreachable, 5xx), callers fail fast for this many
        seconds instead of each retrying at once.
    :param recheck_interval: after a permanent failure, look in the store at most this often (seconds) for a
        new refresh token (someone ran the consent command); otherwise fail fast without calling Entra.
    """

    def __init__(
        self,
        *,
        tenant_id: str,
        client_id: str,
        client_secret: str,
        store: RefreshTokenStore,
        authority: str = "https://login.microsoftonline.com",
        scopes: Sequence[str] = (PARTNER_CENTER_SCOPE,),
        http_client: Any = None,
        refresh_margin: timedelta = timedelta(minutes=5),
        warn_after: timedelta = REFRESH_TOKEN_WARN_AGE,
        lifetime: timedelta = REFRESH_TOKEN_LIFETIME,
        recheck_interval: float = 300.0,
        transient_backoff: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._tenant_id = tenant_id
        self._client_id = client_id
        self._client_secret = client_secret
        self._store = store
        self._authority = authority_url(authority, tenant_id)
        self._scopes = list(scopes)
        self._http_client = http_client
        self._margin = refresh_margin.total_seconds()
        self._warn_after = warn_after
        self._lifetime = lifetime
        self._recheck_interval = recheck_interval
        self._transient_backoff = transient_backoff
        self._transient: tuple[TokenExchangeError, float] | None = None
        self._clock = clock
        self._now = now
        self._lock = asyncio.Lock()
        self._app: Any = None
        self._cached: _CachedToken | None = None
        self._generation = 0
        self._refresh_token: str | None = None
        self._persisted_issued_at: datetime | None = None
        self._failure: TokenExchangeError | None = None
        self._failed_digest: str | None = None
        self._failed_at = 0.0
        #: How many times Entra was asked to redeem the refresh token (for tests and metrics).
        self.exchanges = 0

    def __repr__(self) -> str:
        return (f"AppUserCredential(tenant_id={self._tenant_id!r}, client_id={self._client_id!r}, "
                f"store={self._store!r})")

    # -- public API ------------------------------------------------------------------------------------------

    async def get_token(self, *, force_refresh: bool = False) -> str:
        cached = self._cached
        if self._failure is None and not force_refresh and cached is not None and self._clock() < cached.refresh_at:
            return cached.value
        generation = self._generation
        async with self._lock:
            if self._failure is not None:
                await self._maybe_clear_failure()
            if self._transient is not None and self._clock() < self._transient[1]:
                raise self._transient[0].copy()  # callers queued behind a failed attempt don't retry at once
            cached = self._cached
            if cached is not None and self._clock() < cached.refresh_at and (
                    not force_refresh or self._generation != generation):
                return cached.value  # fresh, or another caller refreshed while we waited
            return await self._exchange()

    async def aclose(self) -> None:
        close = getattr(self._store, "close", None)
        if callable(close):
            await asyncio.to_thread(close)
        app, self._app = self._app, None
        http = getattr(app, "http_client", None) if app is not None else None
        if http is not None and self._http_client is None and callable(getattr(http, "close", None)):
            http.close()
        self._cached = None

    # -- internals -------------------------------------------------------------------------------------------

    def _secrets(self) -> list[str | None]:
        cached = self._cached.value if self._cached else None
        return [self._client_secret, self._refresh_token, cached]

    async def _maybe_clear_failure(self) -> None:
        failure = self._failure
        assert failure is not None
        if self._clock() - self._failed_at < self._recheck_interval:
            raise failure.copy()
        self._failed_at = self._clock()
        try:
            stored = await asyncio.to_thread(self._store.load)
        except AuthenticationError:
            raise failure.copy() from None
        if _digest(stored.value) == self._failed_digest:
            raise failure.copy()
        logger.info("event=refresh_token_replaced: a new refresh token was found in the store; retrying sign-in")
        self._failure = None
        self._failed_digest = None
        self._refresh_token = stored.value
        self._persisted_issued_at = stored.issued_at
        self._cached = None

    async def _load(self) -> str:
        stored = await asyncio.to_thread(self._store.load)
        self._refresh_token = stored.value
        self._persisted_issued_at = stored.issued_at
        return stored.value

    def _build_app(self) -> Any:
        import msal

        return msal.ConfidentialClientApplication(
            self._client_id,
            client_credential=self._client_secret,
            authority=self._authority,
            http_client=self._http_client,
            # The authority comes from our own setting; don't ask login.microsoftonline.com to vouch for it.
            instance_discovery=False,
        )

    def _redeem(self, refresh_token: str) -> dict[str, Any]:
        if self._app is None:
            self._app = self._build_app()  # does OIDC discovery (HTTP), hence here in the worker thread
        result = self._app.acquire_token_by_refresh_token(refresh_token, scopes=self._scopes)
        return dict(result) if isinstance(result, dict) else {"error": "unknown_error"}

    async def _call_entra(self, refresh_token: str) -> dict[str, Any]:
        self.exchanges += 1
        try:
            result = await asyncio.to_thread(self._redeem, refresh_token)
            self._transient = None
            return result
        except Exception as exc:
            text = redact(str(exc), [*self._secrets(), refresh_token])
            error = TokenExchangeError(
                f"Partner Center sign-in could not reach Entra at {self._authority}: {type(exc).__name__}: "
                f"{text[:300]} (will retry on the next call)", error="transport_error", transient=True)
            logger.warning("event=auth_transient_error error_type=%s authority=%s", type(exc).__name__,
                           self._authority)
            self._transient = (error, self._clock() + self._transient_backoff)
            raise error from None

    async def _exchange(self) -> str:
        try:
            refresh_token = self._refresh_token or await self._load()
        except AuthenticationError as exc:
            logger.error("event=auth_failed error=refresh_token_unavailable: %s", redact(str(exc), self._secrets()))
            raise
        result = await self._call_entra(refresh_token)
        if "access_token" not in result and result.get("error") in ("invalid_grant", "invalid_client"):
            # Another instance of the app may have rotated the token since we read it: use the stored one.
            try:
                stored = await asyncio.to_thread(self._store.load)
            except AuthenticationError:
                stored = None
            if stored is not None and stored.value != refresh_token:
                logger.info("event=refresh_token_reloaded: the store holds a newer refresh token; retrying once")
                self._refresh_token = refresh_token = stored.value
                self._persisted_issued_at = stored.issued_at
                result = await self._call_entra(refresh_token)
        if "access_token" not in result:
            error = _explain_result(result, [*self._secrets(), refresh_token])
            if error.transient:
                logger.warning("event=auth_transient_error error=%s code=%s", error.error, error.aadsts)
                self._transient = (error, self._clock() + self._transient_backoff)
                raise error
            self._failure = error
            self._failed_digest = _digest(refresh_token)
            self._failed_at = self._clock()
            self._cached = None
            logger.error("event=auth_failed error=%s code=%s: %s", error.error, error.aadsts, error)
            raise error.copy()

        access_token = str(result["access_token"])
        try:
            expires_in = float(result.get("expires_in", 3600))
        except (TypeError, ValueError):
            expires_in = 3600.0
        margin = min(self._margin, expires_in / 2)
        self._cached = _CachedToken(access_token, self._clock() + expires_in - margin)
        self._generation += 1
        new_refresh = result.get("refresh_token")
        if isinstance(new_refresh, str) and new_refresh and new_refresh != refresh_token:
            self._refresh_token = new_refresh
            try:
                await asyncio.to_thread(self._store.save, new_refresh)
            except Exception as exc:
                text = redact(str(exc), [*self._secrets(), refresh_token, new_refresh])
                logger.warning("event=refresh_token_rotation_failed error_type=%s: could not store the rotated "
                               "refresh token (%s); this process keeps using it, but a restart will fall back to "
                               "the stored one", type(exc).__name__, text[:300])
            else:
                self._persisted_issued_at = self._now()
        logger.info("event=token_acquired expires_in=%d", int(expires_in))
        self._refresh_token_age_check()
        return access_token

    def _refresh_token_age_check(self) -> None:
        """Log ``event=refresh_token_expiring`` when the persisted refresh token is past the warning age."""
        issued = self._persisted_issued_at
        if issued is None:
            return
        if issued.tzinfo is None:
            issued = issued.replace(tzinfo=UTC)
        age = self._now() - issued
        if age < self._warn_after:
            return
        days_left = max(0, (self._lifetime - age).days)
        logger.warning("event=refresh_token_expiring days_left=%d: the stored Partner Center refresh token was "
                       "issued %d days ago and expires after %d days; run `%s` before it does", days_left,
                       age.days, self._lifetime.days, CONSENT_COMMAND)


# ---------------------------------------------------------------------------------------------------------------
# Factory


def is_unresolved_key_vault_reference(value: str | None) -> bool:
    """In Azure an app setting whose Key Vault reference can't be resolved (yet) arrives as the literal text."""
    return value is not None and value.strip().startswith("@Microsoft.KeyVault(")


def require_app_user_settings(settings: Settings, *, need_refresh_token_source: bool = True) -> None:
    """Raise :class:`ConfigurationError` naming the first missing/invalid setting for ``app-user`` auth."""
    required = (
        ("PARTNER_CENTER_TENANT_ID", settings.tenant_id, "set it to the partner's Entra tenant id (a GUID)"),
        ("PARTNER_CENTER_CLIENT_ID", settings.client_id,
         "set it to the application (client) id of the Partner Center app registration"),
        ("PARTNER_CENTER_CLIENT_SECRET", settings.client_secret,
         "set it to a client secret of the app registration (in Azure: a Key Vault reference)"),
    )
    for name, value, fix in required:
        if not value:
            raise ConfigurationError(name, "is required when PARTNER_CENTER_AUTH is app-user", fix)
        if is_unresolved_key_vault_reference(value):
            raise ConfigurationError(
                name, "is a Key Vault reference that did not resolve (the secret doesn't exist yet, or the app's "
                "identity can't read it)", f"run `{CONSENT_COMMAND}` (it stores the secrets) and check the app's "
                "Key Vault role assignment")
    if urlsplit(settings.authority).scheme != "https":
        raise ConfigurationError("PARTNER_CENTER_AUTHORITY", "must be an https URL (msal refuses anything else)",
                                 "use https://login.microsoftonline.com")
    if settings.key_vault_url and urlsplit(settings.key_vault_url).scheme != "https":
        raise ConfigurationError("KEY_VAULT_URL", "must be an https URL", "use https://<vault-name>.vault.azure.net")
    static = settings.refresh_token if not is_unresolved_key_vault_reference(settings.refresh_token) else None
    if need_refresh_token_source and not (settings.key_vault_url or static):
        raise ConfigurationError(
            "KEY_VAULT_URL", "no refresh token source: neither KEY_VAULT_URL nor PARTNER_CENTER_REFRESH_TOKEN is set",
            f"set KEY_VAULT_URL to the vault holding the refresh token (then run `{CONSENT_COMMAND}`)")


def build_refresh_token_store(settings: Settings) -> RefreshTokenStore | None:
    """Key Vault when ``KEY_VAULT_URL`` is set, else the static app setting, else ``None``."""
    if settings.key_vault_url:
        return KeyVaultRefreshTokenStore(settings.key_vault_url)
    if settings.refresh_token and not is_unresolved_key_vault_reference(settings.refresh_token):
        return StaticRefreshTokenStore(settings.refresh_token)
    return None


def build_credential(settings: Settings, *, store: RefreshTokenStore | None = None,
                     http_client: Any = None, scopes: Sequence[str] = (PARTNER_CENTER_SCOPE,)
                     ) -> AccessTokenSource | None:
    """The token source for ``settings``: ``None`` when ``PARTNER_CENTER_AUTH=none`` (loopback sandbox). ``scopes``:
    another resource the same refresh token is redeemed for (the price sheet's Partner API, ``_pricing``)."""
    if settings.auth == "none":
        return None
    require_app_user_settings(settings, need_refresh_token_source=store is None)
    store = store or build_refresh_token_store(settings)
    assert store is not None  # guaranteed by require_app_user_settings
    assert settings.tenant_id and settings.client_id and settings.client_secret
    return AppUserCredential(tenant_id=settings.tenant_id, client_id=settings.client_id,
                             client_secret=settings.client_secret, store=store, authority=settings.authority,
                             http_client=http_client, scopes=scopes)
