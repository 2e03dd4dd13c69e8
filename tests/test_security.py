"""Security properties: no secret in any log record or error text, hostile ids never reach a URL path, unsafe
settings are refused, and the repository holds nothing that looks like a real secret.

The full chain runs with ``PARTNER_CENTER_AUTH=app-user`` through the local host against a sandbox that requires a
bearer token, with the tokens minted by the fake Entra in ``tests/_fake_entra.py`` (TLS with a throwaway
certificate, trusted through ``REQUESTS_CA_BUNDLE`` exactly as a custom CA would be in production). Every value
the fake hands out is known, so every log record (DEBUG, every logger) and every error text can be searched for it.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from azure.storage.queue import QueueServiceClient, TextBase64DecodePolicy

from d365_migration import ConfigurationError, PartnerCenterClient, Settings, build_service, load_settings
from d365_migration._ledger import MigrationLedger
from d365_tooling.golive import go_live_for_every_customer
from d365_tooling.localhost import LocalHost
from d365_tooling.sandbox import DEMO_REPLACEMENT_OFFERS, RETIRED_OFFERS, SandboxConfig, SandboxServer, SandboxState
from tests._fake_entra import FakeEntra

REPO = Path(__file__).resolve().parent.parent
SALES = next(o for o in RETIRED_OFFERS if o.family == "sales" and o.audience == "commercial")
AZURITE_DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
LOGGERS = ("", "d365_migration", "httpx", "httpcore", "msal", "azure", "urllib3", "requests", "uvicorn",
           "asyncio")


@pytest.fixture
def everything(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture every record at DEBUG, including the normally quiet library loggers."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name or None)
    return caplog


def record_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    texts = [caplog.text]
    for r in caplog.records:
        texts.append(r.getMessage())
        texts.append(str(r.args))
        texts.append(repr(r.__dict__))
        if r.exc_info and r.exc_info[1] is not None:
            texts.append(repr(r.exc_info[1]))
            texts.append(str(r.exc_info[1]))
        if r.exc_text:
            texts.append(r.exc_text)
    return texts


def assert_clean(texts: list[str], secrets: list[str]) -> None:
    assert secrets and all(len(s) >= 16 for s in secrets)
    for text in texts:
        for value in secrets:
            assert value not in text, "a secret or token value leaked"
        assert "eyJ0eXAi" not in text, "a JWT-looking token leaked"
        assert not re.search(r"(?i)authorization['\"]?\s*[:=]\s*['\"]?bearer\s+\S{8,}", text), \
            "an Authorization header value leaked"


def test_the_leak_check_itself_catches_a_leak(everything: pytest.LogCaptureFixture) -> None:
    secret = "fake~" + uuid.uuid4().hex
    logging.getLogger("httpx").debug("headers: %s", {"Authorization": f"Bearer {secret}"})
    with pytest.raises(AssertionError):
        assert_clean(record_texts(everything), [secret])
    with pytest.raises(AssertionError):
        assert_clean(["Authorization: Bearer abcdefghijkl"], ["x" * 16])


# ----------------------------------------------------------------------------------------- app-user chain


def add_tenant(state: SandboxState) -> tuple[str, str]:
    cid = str(uuid.uuid4())
    state.add_customer(cid, f"t{cid[:6]}.onmicrosoft.com", f"Tenant {cid[:6]}")
    for i in range(2):
        uid = str(uuid.uuid4())
        state.add_user(cid, uid, f"user{i}@t{cid[:6]}.example", "U", str(i), "US", [SALES.sku.id])
    end = (datetime.now(UTC) + timedelta(days=20)).strftime("%Y-%m-%dT00:00:00Z")
    return cid, state.add_subscription(cid, offer=SALES, quantity=3, commitment_end=end).id.lower()


def storage_texts(storage: str) -> list[str]:
    """Every queue message (poison queues included) and the ledger, as text."""
    texts = []
    with QueueServiceClient.from_connection_string(storage) as service:
        for props in service.list_queues():
            qc = service.get_queue_client(props.name, message_decode_policy=TextBase64DecodePolicy())
            texts += [m.content for m in qc.peek_messages(max_messages=32)]
    return texts


async def test_app_user_chain_never_logs_or_raises_a_secret(storage: str, everything: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    state = SandboxState()
    cid, sid = add_tenant(state)
    with FakeEntra() as entra, SandboxServer(state, SandboxConfig(require_auth=True)) as server:
        refresh_token = entra.issue_refresh_token()
        env = {
            "PARTNER_CENTER_ENDPOINT": server.url, "PARTNER_CENTER_AUTH": "app-user",
            "PARTNER_CENTER_TENANT_ID": entra.tenant_id, "PARTNER_CENTER_CLIENT_ID": entra.client_id,
            "PARTNER_CENTER_CLIENT_SECRET": entra.client_secret, "PARTNER_CENTER_REFRESH_TOKEN": refresh_token,
            "PARTNER_CENTER_AUTHORITY": entra.authority, "REQUESTS_CA_BUNDLE": str(entra.cert_path),
            "DRY_RUN": "false", "REPLACEMENT_OFFERS": json.dumps(DEMO_REPLACEMENT_OFFERS),
            "PROVISIONING_POLL_SECONDS": "1", "DETECT_SCHEDULE": "0 0 6 * * *",
            "PARTNER_CENTER_REQUESTS_PER_MINUTE": "100000", "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": "100000",
        }
        go_live_for_every_customer(storage)
        async with LocalHost(REPO, connection_string=storage, env=env,
                             host_overrides={"visibilityTimeout": 0.2, "maxPollingInterval": 0.2}) as host:
            await host.fire_timer("detect_expiring")
            report = await host.run(timeout=40, idle_seconds=0.8)
            status = await host.call_http("status", params={"format": "json"})
            page = await host.call_http("status")
        assert report.failures == 0, report.to_dict()
        ledger = MigrationLedger.from_connection_string(storage)
        try:
            (record,) = await ledger.list_records()
        finally:
            ledger.close()
        assert record.state == "completed", record.reason
        # the sandbox demanded a token on every call, so tokens really were used
        assert entra.calls["token:refresh_token"] >= 1
        assert all(r["status"] != 401 for r in state.requests())
        assert state.subscription(cid, sid)["status"] == "suspended"

        # a refused refresh (expired) and an unreachable Entra: their errors must not carry a secret either
        errors: list[str] = []
        entra.fail_refresh_with("AADSTS700082")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(entra.cert_path))  # the host restored os.environ on close
        service = build_service(Settings.from_env({**env, "AzureWebJobsStorage": storage}), max_attempts=1)
        try:
            with pytest.raises(Exception) as refused:
                await service.client.list_subscriptions(cid)
            errors += [str(refused.value), repr(refused.value)]
            assert "AADSTS700082" in str(refused.value) and "consent" in str(refused.value)
        finally:
            await service.client.aclose()
            service.ledger.close()
            service.queues.close()
        secrets = [entra.client_secret, refresh_token, *entra.issued_secrets()]
    assert any(r.name.startswith(("httpx", "httpcore")) for r in everything.records)  # DEBUG capture works
    assert any(r.name.startswith("d365_migration") for r in everything.records)
    texts = record_texts(everything) + errors + storage_texts(storage)
    texts += [json.dumps(record.history), record.reason or "", status.get_body().decode(), page.get_body().decode()]
    assert_clean(texts, secrets)


def test_settings_and_credential_reprs_hide_secrets() -> None:
    secret, token = "fake~" + uuid.uuid4().hex, "1.AR" + uuid.uuid4().hex
    conn = f"DefaultEndpointsProtocol=https;AccountName=x;AccountKey={uuid.uuid4().hex};"
    settings = load_settings({"PARTNER_CENTER_TENANT_ID": str(uuid.uuid4()), "PARTNER_CENTER_CLIENT_ID": "app",
                              "PARTNER_CENTER_CLIENT_SECRET": secret, "PARTNER_CENTER_REFRESH_TOKEN": token,
                              "AzureWebJobsStorage": conn})
    from d365_migration._app import build_credential

    credential = build_credential(settings)
    for text in (repr(settings), str(settings), repr(credential)):
        assert secret not in text and token not in text and conn not in text


# ----------------------------------------------------------------------------------------- ids in URL paths


BAD_IDS = ["../../v1/customers", "a/b", "x?size=1", "x#y", "%2e%2e", "..", "", " ", "a b", "x\r\nHost: evil",
           "é", "a" * 200, "\u2215etc"]


async def test_invalid_ids_are_refused_before_any_request() -> None:
    state = SandboxState()
    with SandboxServer(state) as server:
        good = str(uuid.uuid4())
        async with PartnerCenterClient(server.url, None, max_attempts=1) as client:
            for bad in BAD_IDS:
                calls = [
                    client.list_subscriptions(bad),
                    client.get_subscription(bad, good),
                    client.get_subscription(good, bad),
                    client.get_provisioning_status(good, bad),
                    client.get_order(good, bad),
                    client.checkout_cart(good, bad, request_id=good),
                    client.get_user_licenses(good, bad),
                    client.list_subscribed_skus(bad),
                    client.update_user_licenses(good, bad, assign=[], remove=[], request_id=good),
                ]
                for call in calls:
                    with pytest.raises(ValueError, match=r"not a valid id|not a GUID"):
                        await call
            with pytest.raises(ValueError, match="not a GUID"):
                await client.create_order(good, "../orders", 1, friendly_name="x", billing_cycle="monthly",
                                          request_id=good)
        assert state.requests() == []


# ----------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("endpoint", ["https://api.partnercenter.microsoft.com", "https://localhost.evil.example",
                                      "http://127.0.0.1.nip.io", "http://0.0.0.0:8080", "http://10.0.0.5"])
def test_auth_none_is_refused_for_non_loopback_endpoints(endpoint: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings({"PARTNER_CENTER_AUTH": "none", "PARTNER_CENTER_ENDPOINT": endpoint})
    assert info.value.setting in ("PARTNER_CENTER_AUTH", "PARTNER_CENTER_ENDPOINT")


@pytest.mark.parametrize("endpoint", ["http://api.partnercenter.microsoft.com", "http://localhost.evil.example",
                                      "http://user@127.0.0.1@evil.example", "http://192.168.1.10:8765"])
def test_plain_http_is_refused_for_non_loopback_endpoints(endpoint: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings({"PARTNER_CENTER_ENDPOINT": endpoint})
    assert info.value.setting == "PARTNER_CENTER_ENDPOINT"


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765"])
def test_loopback_sandbox_is_allowed_without_auth(endpoint: str) -> None:
    assert load_settings({"PARTNER_CENTER_AUTH": "none", "PARTNER_CENTER_ENDPOINT": endpoint}).auth == "none"


def test_plain_http_authority_is_refused() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings({"PARTNER_CENTER_AUTHORITY": "http://login.example.com"})
    assert info.value.setting == "PARTNER_CENTER_AUTHORITY"


# ----------------------------------------------------------------------------------------- the repository


SECRET_PATTERNS = [
    ("storage account key", re.compile(r"AccountKey=([A-Za-z0-9+/=]{20,})")),
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("SAS signature", re.compile(r"[?&;]sig=[A-Za-z0-9%+/=]{20,}")),
    ("JWT", re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")),
    ("secret literal", re.compile(
        r"(?i)(client_secret|clientsecret|refresh_token|password|secret|api_key|apikey)['\"]?\s*[:=]\s*"
        r"['\"]([^'\"\s]{12,})['\"]")),
]


def _placeholder(value: str) -> bool:
    return bool(re.search(r"[<>{}$%@]|xxx|example|changeme|your-|partner-center-|\.\.\.", value, re.I))


def _random_looking(value: str) -> bool:
    """Tests may use obviously fake literals ("s3cr3t-value"); a long mixed-case+digit string is not obvious."""
    return (len(value) >= 20 and bool(re.search(r"[A-Z]", value)) and bool(re.search(r"[a-z]", value))
            and bool(re.search(r"\d", value)))


def scan_text(path: str, text: str) -> list[str]:
    found = []
    for name, pattern in SECRET_PATTERNS:
        for m in pattern.finditer(text):
            value = m.group(m.lastindex or 0)
            if name == "storage account key" and value == AZURITE_DEV_KEY:
                continue
            if name == "secret literal" and (_placeholder(value) or (path.startswith("tests/")
                                                                    and not _random_looking(value))):
                continue
            if name == "JWT" and path.startswith("tests/"):
                continue
            found.append(f"{path}: {name}")
    return found


def test_the_repository_scan_catches_planted_secrets() -> None:
    planted = {
        "a.py": 'client_secret = "Qx9~8kLmN2pRsT4vWxYz"\n',
        "b.json": '{"AzureWebJobsStorage": "DefaultEndpointsProtocol=https;AccountName=prod;AccountKey='
                  'c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0==;"}',
        "c.md": "token: eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2ln\n",
        "d.pem": "-----BEGIN RSA PRIVATE KEY-----\n",
    }
    for path, text in planted.items():
        assert scan_text(path, text), path
    assert scan_text("tests/f.py", 'client_secret = "Qx9~8kLmN2pRsT4vWxYz"')  # random-looking, even in tests
    assert scan_text("e.py", f"AccountKey={AZURITE_DEV_KEY};") == []
    assert scan_text("tests/g.py", 'client_secret = "s3cr3t-value"') == []


SCANNER_FIXTURES = "tests/test_security.py"


def test_nothing_in_the_repository_looks_like_a_real_secret() -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    problems: list[str] = []
    scanned = 0
    for raw in files.split(b"\0"):
        if not raw:
            continue
        path = raw.decode()
        if path == SCANNER_FIXTURES:
            continue  # this file plants fake secrets on purpose, to prove the scan catches them
        full = REPO / path
        if not full.is_file() or full.stat().st_size > 2_000_000:
            continue
        data = full.read_bytes()
        if b"\0" in data[:4096]:
            continue  # binary
        scanned += 1
        problems += scan_text(path, data.decode("utf-8", "replace"))
    assert scanned > 50
    assert problems == []
    tracked = files.decode().split("\0")
    assert "local.settings.json" not in tracked  # the real settings file is never committed
    assert not [p for p in tracked if p.endswith((".pfx", ".p12", ".key", ".pem"))]
