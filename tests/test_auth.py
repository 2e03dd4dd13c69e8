"""End-to-end tests of Partner Center auth (consent, exchange, rotation, failures) against a local fake Entra.

All identifiers and secrets are generated at test time; nothing real is used.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from d365_migration._auth import (
    CONSENT_COMMAND,
    AccessTokenSource,
    AppUserCredential,
    KeyVaultRefreshTokenStore,
    MemoryRefreshTokenStore,
    RefreshTokenStoreError,
    StaticRefreshTokenStore,
    StoredRefreshToken,
    TokenExchangeError,
    build_credential,
)
from d365_migration._consent import run_consent
from d365_migration._exceptions import AuthenticationError, ConfigurationError
from d365_migration._settings import Settings, load_settings
from tests._fake_entra import PARTNER_CENTER_AUDIENCE, FakeEntra, decode_jwt_claims


@pytest.fixture
def entra() -> Iterator[FakeEntra]:
    with FakeEntra() as fake:
        yield fake


@pytest.fixture
def leak_watch(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture everything at DEBUG, including msal's and urllib3's loggers (normally silenced)."""
    caplog.set_level(logging.DEBUG)
    for name in ("msal", "urllib3", "d365_migration", "azure"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings_for(fake: FakeEntra, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "auth": "app-user", "tenant_id": fake.tenant_id, "client_id": fake.client_id,
        "client_secret": fake.client_secret, "authority": fake.authority,
        "key_vault_url": "https://fake-vault.vault.azure.net",
    }
    values.update(overrides)
    return Settings(**values)


def credential_for(fake: FakeEntra, store: Any, **kwargs: Any) -> AppUserCredential:
    return AppUserCredential(tenant_id=fake.tenant_id, client_id=fake.client_id, client_secret=fake.client_secret,
                             store=store, authority=fake.authority, http_client=fake.http_session(), **kwargs)


def consent(fake: FakeEntra, store: MemoryRefreshTokenStore) -> str:
    out = io.StringIO()
    assert run_consent(settings_for(fake), out=out, store=store, http_client=fake.http_session(),
                       timeout_seconds=30) == 0, out.getvalue()
    return out.getvalue()


def assert_no_secrets(fake: FakeEntra, texts: list[str], caplog: pytest.LogCaptureFixture,
                      extra: Sequence[str] = ()) -> None:
    values = [fake.client_secret, *fake.issued_secrets(), *extra]
    assert len(values) > 1
    haystack = [r.getMessage() for r in caplog.records] + [str(r.args) for r in caplog.records] + texts
    haystack += [caplog.text]
    for text in haystack:
        for value in values:
            assert value not in text, "a secret/token value leaked into a log record or message"
        assert "eyJ0eXAi" not in text  # no JWT-looking token either


def test_leak_check_catches_a_leak(entra: FakeEntra, caplog: pytest.LogCaptureFixture) -> None:
    token = entra.issue_refresh_token()
    logging.getLogger("d365_migration.test").warning("oops %s", token)
    with pytest.raises(AssertionError):
        assert_no_secrets(entra, [], caplog)


# ---------------------------------------------------------------------------------------------------------------
# consent


def test_consent_stores_refresh_token_via_confidential_device_flow(entra: FakeEntra) -> None:
    entra.pending_polls = 1  # the user takes a moment: one authorization_pending answer first
    store = MemoryRefreshTokenStore()
    text = consent(entra, store)
    assert store.value is not None and entra.is_valid_refresh_token(store.value)
    assert "microsoft.com/devicelogin" in text and "Enter the code" in text
    assert entra.user in text and "stored in" in text
    assert store.value not in text and entra.client_secret not in text
    assert entra.calls["devicecode"] == 1 and entra.calls["token:urn:ietf:params:oauth:grant-type:device_code"] == 2


def test_consent_stores_client_secret_and_refresh_token_in_key_vault(entra: FakeEntra) -> None:
    vault = FakeSecretClient()
    secrets_client = FakeSecretClient()
    store = KeyVaultRefreshTokenStore("https://v.vault.azure.net", client=vault)
    secret_store = KeyVaultRefreshTokenStore("https://v.vault.azure.net", secret_name="partner-center-client-secret",
                                             client=secrets_client)
    out = io.StringIO()
    assert run_consent(settings_for(entra), out=out, store=store, client_secret_store=secret_store,
                       http_client=entra.http_session()) == 0, out.getvalue()
    assert secrets_client.versions[-1].value == entra.client_secret
    assert entra.is_valid_refresh_token(vault.versions[-1].value)
    assert "partner-center-client-secret" in out.getvalue() and entra.client_secret not in out.getvalue()


def test_consent_refuses_a_sign_in_without_mfa(entra: FakeEntra) -> None:
    entra.mfa = False
    store = MemoryRefreshTokenStore()
    out = io.StringIO()
    assert run_consent(settings_for(entra), out=out, store=store, http_client=entra.http_session()) == 1
    assert "WITHOUT multi-factor" in out.getvalue() and store.value is None


def test_consent_needs_key_vault_or_a_store() -> None:
    settings = Settings(tenant_id=str(uuid.uuid4()), client_id=str(uuid.uuid4()), client_secret="x" * 20)
    out = io.StringIO()
    assert run_consent(settings, out=out) == 1
    assert "KEY_VAULT_URL" in out.getvalue()


def test_consent_reports_missing_setting() -> None:
    out = io.StringIO()
    assert run_consent(Settings(tenant_id=str(uuid.uuid4())), out=out, store=MemoryRefreshTokenStore()) == 1
    assert "PARTNER_CENTER_CLIENT_ID" in out.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# exchange, rotation, caching, concurrency


async def test_exchange_yields_partner_center_token_and_rotates(entra: FakeEntra, leak_watch: Any) -> None:
    store = MemoryRefreshTokenStore()
    consent(entra, store)
    original, saves = store.value, store.saves
    assert original is not None
    credential = credential_for(entra, store)
    assert isinstance(credential, AccessTokenSource)
    token = await credential.get_token()
    claims = decode_jwt_claims(token)
    assert claims["aud"] == PARTNER_CENTER_AUDIENCE and claims["scp"] == "user_impersonation"
    assert "mfa" in claims["amr"]
    # rotation: a new refresh token was written back and the old one is dead at the fake
    assert store.value is not None and store.value != original and store.saves == saves + 1
    assert entra.is_valid_refresh_token(store.value) and not entra.is_valid_refresh_token(original)
    answer = entra.http_session().post(entra.token_endpoint, timeout=10, data={
        "grant_type": "refresh_token", "refresh_token": original, "client_id": entra.client_id,
        "client_secret": entra.client_secret, "scope": "https://api.partnercenter.microsoft.com/.default"})
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"
    # a forced refresh (after a 401) redeems the rotated token and rotates again
    second = await credential.get_token(force_refresh=True)
    assert second != token and store.saves == saves + 2
    # two redemptions by the credential + the test's own attempt with the old token; discovery once per msal app
    assert credential.exchanges == 2 and entra.calls["token:refresh_token"] == 3
    assert entra.calls["discovery"] == 2  # consent's app + the credential's app (reused across exchanges)
    await credential.aclose()
    assert_no_secrets(entra, [], leak_watch)


async def test_concurrent_callers_share_one_exchange(entra: FakeEntra) -> None:
    store = MemoryRefreshTokenStore(entra.issue_refresh_token())
    credential = credential_for(entra, store)
    tokens = await asyncio.gather(*(credential.get_token() for _ in range(20)))
    assert len(set(tokens)) == 1
    assert entra.calls["token:refresh_token"] == 1 and credential.exchanges == 1
    # 401 storm: many requests force a refresh at once → still one exchange
    refreshed = await asyncio.gather(*(credential.get_token(force_refresh=True) for _ in range(10)))
    assert len(set(refreshed)) == 1 and refreshed[0] != tokens[0]
    assert entra.calls["token:refresh_token"] == 2
    await credential.aclose()


async def test_cached_token_reused_until_near_expiry(entra: FakeEntra) -> None:
    entra.access_token_lifetime = 3600
    clock = Clock()
    store = MemoryRefreshTokenStore(entra.issue_refresh_token())
    credential = credential_for(entra, store, clock=clock, refresh_margin=timedelta(minutes=5))
    first = await credential.get_token()
    clock.now += 3600 - 301  # just before the refresh margin
    assert await credential.get_token() == first
    assert entra.calls["token:refresh_token"] == 1
    clock.now += 2  # inside the 5-minute margin → renew
    second = await credential.get_token()
    assert second != first and entra.calls["token:refresh_token"] == 2
    await credential.aclose()


async def test_rotation_write_failure_is_a_warning_not_an_error(entra: FakeEntra, leak_watch: Any) -> None:
    store = MemoryRefreshTokenStore(entra.issue_refresh_token())
    store.fail_saves = True
    credential = credential_for(entra, store)
    assert await credential.get_token()
    assert any("event=refresh_token_rotation_failed" in r.getMessage() and r.levelno == logging.WARNING
               for r in leak_watch.records)
    # the process keeps the rotated token in memory, so it can still refresh
    assert await credential.get_token(force_refresh=True)
    assert_no_secrets(entra, [], leak_watch)


async def test_reloads_store_when_another_instance_rotated(entra: FakeEntra) -> None:
    store = MemoryRefreshTokenStore(entra.issue_refresh_token())
    a, b = credential_for(entra, store), credential_for(entra, store)
    await a.get_token()  # a rotates; b still holds nothing yet
    await b.get_token()  # b loads the rotated one
    await a.get_token(force_refresh=True)  # a rotates again: b's in-memory token is now dead
    assert await b.get_token(force_refresh=True)  # b retries with the store's newer token
    assert b.exchanges == 3


# ---------------------------------------------------------------------------------------------------------------
# failures


@pytest.mark.parametrize(("code", "words"), [("AADSTS700082", "expired"), ("AADSTS50076", "multi-factor")])
async def test_refused_refresh_token_fails_with_instructions_then_fails_fast(
        entra: FakeEntra, leak_watch: Any, code: str, words: str) -> None:
    clock = Clock()
    store = MemoryRefreshTokenStore(entra.issue_refresh_token())
    credential = credential_for(entra, store, clock=clock, recheck_interval=300)
    entra.fail_refresh_with(code)
    with pytest.raises(AuthenticationError) as first:
        await credential.get_token()
    message = str(first.value)
    assert CONSENT_COMMAND in message and code in message and words in message
    assert isinstance(first.value, TokenExchangeError) and first.value.aadsts == code
    failed = [r for r in leak_watch.records if "event=auth_failed" in r.getMessage()]
    assert failed and failed[0].levelno == logging.ERROR
    calls = entra.calls["token:refresh_token"]
    # fail fast: no more calls to Entra, same message
    for _ in range(5):
        with pytest.raises(AuthenticationError) as again:
            await credential.get_token(force_refresh=True)
        assert str(again.value) == message
    assert entra.calls["token:refresh_token"] == calls
    # even after the recheck interval: the store still holds the same (refused) token → still no Entra call
    clock.now += 301
    with pytest.raises(AuthenticationError):
        await credential.get_token()
    assert entra.calls["token:refresh_token"] == calls
    assert_no_secrets(entra, [message, str(again.value)], leak_watch)


async def test_new_consent_clears_the_failure(entra: FakeEntra) -> None:
    clock = Clock()
    store = MemoryRefreshTokenStore(entra.issue_refresh_token())
    credential = credential_for(entra, store, clock=clock, recheck_interval=300)
    entra.fail_refresh_with("AADSTS700082")
    with pytest.raises(AuthenticationError):
        await credential.get_token()
    entra.fail_refresh_with(None)
    consent(entra, store)  # an operator re-runs consent
    with pytest.raises(AuthenticationError):  # within the recheck interval: still failing fast
        await credential.get_token()
    clock.now += 301
    assert await credential.get_token()


async def test_wrong_client_secret_says_to_fix_the_secret(entra: FakeEntra, leak_watch: Any) -> None:
    store = MemoryRefreshTokenStore(entra.issue_refresh_token())
    wrong = "wrong~" + secrets.token_urlsafe(20)
    credential = AppUserCredential(tenant_id=entra.tenant_id, client_id=entra.client_id, client_secret=wrong,
                                   store=store, authority=entra.authority, http_client=entra.http_session())
    with pytest.raises(AuthenticationError) as info:
        await credential.get_token()
    assert "AADSTS7000215" in str(info.value) and "PARTNER_CENTER_CLIENT_SECRET" in str(info.value)
    assert_no_secrets(entra, [str(info.value)], leak_watch, extra=[wrong])


async def test_public_client_refresh_token_is_explained(entra: FakeEntra) -> None:
    store = MemoryRefreshTokenStore(entra.issue_refresh_token(confidential=False))
    with pytest.raises(AuthenticationError) as info:
        await credential_for(entra, store).get_token()
    assert "AADSTS700025" in str(info.value) and CONSENT_COMMAND in str(info.value)


async def test_unreachable_entra_is_transient_and_retried(entra: FakeEntra) -> None:
    clock = Clock()
    store = MemoryRefreshTokenStore(entra.issue_refresh_token())
    credential = credential_for(entra, store, clock=clock, transient_backoff=5)
    port = entra.port
    entra.stop()
    results = await asyncio.gather(*(credential.get_token() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, TokenExchangeError) and r.transient for r in results)
    assert str(port) in str(results[0])
    assert credential.exchanges == 1  # the queued callers failed fast instead of each trying
    # not latched: after the short backoff the next call tries again (and fails again: the fake is gone)
    clock.now += 6
    with pytest.raises(TokenExchangeError):
        await credential.get_token()
    assert credential.exchanges == 2


async def test_missing_refresh_token_in_store_says_run_consent(entra: FakeEntra, leak_watch: Any) -> None:
    with pytest.raises(AuthenticationError) as info:
        await credential_for(entra, MemoryRefreshTokenStore()).get_token()
    assert CONSENT_COMMAND in str(info.value)
    assert any("event=auth_failed" in r.getMessage() for r in leak_watch.records)
    assert entra.calls["token:refresh_token"] == 0


# ---------------------------------------------------------------------------------------------------------------
# expiry warning


async def test_old_refresh_token_warns_with_marker(entra: FakeEntra, leak_watch: Any) -> None:
    now = datetime(2026, 11, 25, tzinfo=UTC)
    issued = now - timedelta(days=70)
    store = StaticRefreshTokenStore(entra.issue_refresh_token(), issued_at=issued)  # can't persist rotation
    credential = credential_for(entra, store, now=lambda: now)
    assert await credential.get_token()
    warnings = [r for r in leak_watch.records if "event=refresh_token_expiring" in r.getMessage()]
    assert warnings and warnings[0].levelno == logging.WARNING
    assert "days_left=20" in warnings[0].getMessage() and CONSENT_COMMAND in warnings[0].getMessage()
    assert any("event=refresh_token_rotation_failed" in r.getMessage() for r in leak_watch.records)
    assert_no_secrets(entra, [], leak_watch)


async def test_young_or_rotated_refresh_token_does_not_warn(entra: FakeEntra, leak_watch: Any) -> None:
    now = datetime(2026, 11, 25, tzinfo=UTC)
    store = MemoryRefreshTokenStore(entra.issue_refresh_token(), issued_at=now - timedelta(days=75),
                                    now=lambda: now)
    credential = credential_for(entra, store, now=lambda: now)
    assert await credential.get_token()  # old, but rotation is persisted → the stored token is new now
    assert not [r for r in leak_watch.records if "event=refresh_token_expiring" in r.getMessage()]


# ---------------------------------------------------------------------------------------------------------------
# build_credential and settings


def test_build_credential_none_mode() -> None:
    settings = load_settings({"PARTNER_CENTER_AUTH": "none", "PARTNER_CENTER_ENDPOINT": "http://127.0.0.1:8080"})
    assert build_credential(settings) is None


@pytest.mark.parametrize(("missing", "setting"), [
    ("tenant_id", "PARTNER_CENTER_TENANT_ID"),
    ("client_id", "PARTNER_CENTER_CLIENT_ID"),
    ("client_secret", "PARTNER_CENTER_CLIENT_SECRET"),
    ("key_vault_url", "KEY_VAULT_URL"),
])
def test_build_credential_names_missing_setting(missing: str, setting: str) -> None:
    values: dict[str, Any] = {"tenant_id": str(uuid.uuid4()), "client_id": str(uuid.uuid4()),
                              "client_secret": secrets.token_urlsafe(16),
                              "key_vault_url": "https://v.vault.azure.net"}
    values[missing] = None
    with pytest.raises(ConfigurationError) as info:
        build_credential(Settings(**values))
    assert info.value.setting == setting and setting in str(info.value)
    assert values["client_secret"] is None or values["client_secret"] not in str(info.value)


def test_build_credential_uses_static_refresh_token_setting() -> None:
    value = secrets.token_urlsafe(32)
    settings = load_settings({"PARTNER_CENTER_TENANT_ID": str(uuid.uuid4()), "PARTNER_CENTER_CLIENT_ID": "app",
                              "PARTNER_CENTER_CLIENT_SECRET": secrets.token_urlsafe(16),
                              "PARTNER_CENTER_REFRESH_TOKEN": value})
    credential = build_credential(settings)
    assert isinstance(credential, AppUserCredential)
    assert value not in repr(credential) and value not in repr(StoredRefreshToken(value, None))


def test_build_credential_prefers_key_vault() -> None:
    settings = Settings(tenant_id=str(uuid.uuid4()), client_id="app", client_secret="s" * 20, refresh_token="r" * 20,
                        key_vault_url="https://v.vault.azure.net")
    credential = build_credential(settings)
    assert isinstance(credential, AppUserCredential)
    assert "KeyVaultRefreshTokenStore" in repr(credential)


def test_build_credential_rejects_unresolved_key_vault_reference() -> None:
    reference = "@Microsoft.KeyVault(SecretUri=https://v.vault.azure.net/secrets/partner-center-client-secret/)"
    settings = Settings(tenant_id=str(uuid.uuid4()), client_id="app", client_secret=reference,
                        key_vault_url="https://v.vault.azure.net")
    with pytest.raises(ConfigurationError) as info:
        build_credential(settings)
    assert info.value.setting == "PARTNER_CENTER_CLIENT_SECRET" and CONSENT_COMMAND in str(info.value)
    # an unresolved refresh-token reference without KEY_VAULT_URL is no refresh token source
    settings = Settings(tenant_id=str(uuid.uuid4()), client_id="app", client_secret="s" * 20,
                        refresh_token=reference.replace("client-secret", "refresh-token"))
    with pytest.raises(ConfigurationError) as info:
        build_credential(settings)
    assert info.value.setting == "KEY_VAULT_URL"


def test_build_credential_rejects_http_authority() -> None:
    settings = Settings(tenant_id=str(uuid.uuid4()), client_id="app", client_secret="s" * 20,
                        key_vault_url="https://v.vault.azure.net", authority="http://127.0.0.1:9")
    with pytest.raises(ConfigurationError) as info:
        build_credential(settings)
    assert info.value.setting == "PARTNER_CENTER_AUTHORITY"


# ---------------------------------------------------------------------------------------------------------------
# Key Vault store (with a stand-in SecretClient: no network)


class _Props:
    def __init__(self, created_on: datetime) -> None:
        self.created_on = created_on


class _Secret:
    def __init__(self, value: str, created_on: datetime) -> None:
        self.value = value
        self.properties = _Props(created_on)


class FakeSecretClient:
    def __init__(self) -> None:
        self.versions: list[_Secret] = []
        self.error: Exception | None = None
        self.tags: list[dict[str, str]] = []

    def get_secret(self, name: str) -> _Secret:
        from azure.core.exceptions import ResourceNotFoundError

        if self.error is not None:
            raise self.error
        if not self.versions:
            raise ResourceNotFoundError(f"secret {name} not found")
        return self.versions[-1]

    def set_secret(self, name: str, value: str, **kwargs: Any) -> None:
        if self.error is not None:
            raise self.error
        self.tags.append(kwargs.get("tags") or {})
        self.versions.append(_Secret(value, datetime.now(UTC)))


def test_key_vault_store_roundtrip_and_errors() -> None:
    from azure.core.exceptions import HttpResponseError

    client = FakeSecretClient()
    store = KeyVaultRefreshTokenStore("https://v.vault.azure.net", client=client)
    with pytest.raises(RefreshTokenStoreError) as missing:
        store.load()
    assert CONSENT_COMMAND in str(missing.value)
    value = secrets.token_urlsafe(32)
    store.save(value)
    loaded = store.load()
    assert loaded.value == value and loaded.issued_at is not None
    assert client.tags[-1]["writtenBy"] == "d365_migration"
    denied = HttpResponseError(message="Forbidden")
    denied.status_code = 403
    client.error = denied
    with pytest.raises(RefreshTokenStoreError) as info:
        store.load()
    assert "Key Vault Secrets Officer" in str(info.value) and value not in str(info.value)


async def test_credential_with_key_vault_store_end_to_end(entra: FakeEntra) -> None:
    client = FakeSecretClient()
    store = KeyVaultRefreshTokenStore("https://v.vault.azure.net", client=client)
    store.save(entra.issue_refresh_token())
    credential = credential_for(entra, store)
    assert await credential.get_token()
    assert len(client.versions) == 2 and entra.is_valid_refresh_token(client.versions[-1].value)


def test_msal_logger_is_quiet_by_default() -> None:
    assert logging.getLogger("msal").level == logging.WARNING
