"""Settings: defaults that are safe, and a bad setting stops start-up naming the setting and the fix."""

from __future__ import annotations

import json

import pytest

from d365_migration import ConfigurationError, load_settings

NCE = "CFQ7TTC0LH18:0001:CFQ7TTC0K971"
GUID = "7a1c2e3b-4d5f-4a6b-8c9d-0e1f2a3b4c5d"


def test_defaults_are_safe() -> None:
    s = load_settings({})
    assert s.dry_run is True  # a tool that spends money buys nothing until told to
    assert s.auth == "app-user"
    assert s.endpoint == "https://api.partnercenter.microsoft.com"
    assert s.expiry_window_days == 60
    assert s.requests_per_minute == 500
    # a lost write is re-sent only once the documented order-list lag is over
    from d365_migration.steps import ORDER_LIST_LAG

    assert s.lost_write_resend_wait_seconds == ORDER_LIST_LAG.total_seconds()


@pytest.mark.parametrize("value,expected", [("false", False), ("FALSE", False), ("0", False), ("true", True),
                                            ("", True)])
def test_dry_run_parsing(value: str, expected: bool) -> None:
    assert load_settings({"DRY_RUN": value}).dry_run is expected


@pytest.mark.parametrize(
    "env,setting",
    [
        ({"DRY_RUN": "maybe"}, "DRY_RUN"),
        ({"PARTNER_CENTER_AUTH": "app-only"}, "PARTNER_CENTER_AUTH"),
        ({"EXPIRY_WINDOW_DAYS": "-5"}, "EXPIRY_WINDOW_DAYS"),
        ({"EXPIRY_WINDOW_DAYS": "soon"}, "EXPIRY_WINDOW_DAYS"),
        # 0 would re-send a lost write at once, before Partner Center could show it
        ({"LOST_WRITE_RESEND_WAIT_SECONDS": "0"}, "LOST_WRITE_RESEND_WAIT_SECONDS"),
        ({"REPLACEMENT_OFFERS": "{not json"}, "REPLACEMENT_OFFERS"),
        ({"REPLACEMENT_OFFERS": json.dumps({"sales": {"commercial": "Sales Pro"}})}, "REPLACEMENT_OFFERS"),
        ({"REPLACEMENT_OFFERS": json.dumps({"marketing": {"commercial": NCE}})}, "REPLACEMENT_OFFERS"),
        ({"REPLACEMENT_OFFERS": json.dumps({"sales": {"nonprofit": NCE}})}, "REPLACEMENT_OFFERS"),
        ({"REPLACEMENT_OFFERS": "[]"}, "REPLACEMENT_OFFERS"),
        ({"PARTNER_CENTER_ENDPOINT": "ftp://x"}, "PARTNER_CENTER_ENDPOINT"),
        ({"PARTNER_CENTER_ENDPOINT": "http://partner.example.com"}, "PARTNER_CENTER_ENDPOINT"),
        ({"CUSTOMER_ALLOWLIST": "contoso"}, "CUSTOMER_ALLOWLIST"),
        ({"LEDGER_TABLE": "my-table"}, "LEDGER_TABLE"),
        ({"PARTNER_CENTER_TENANT_ID": "contoso.onmicrosoft.com"}, "PARTNER_CENTER_TENANT_ID"),
    ],
)
def test_bad_setting_names_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(env)
    assert info.value.setting == setting
    assert setting in str(info.value)
    assert info.value.fix  # says how to fix it


def test_auth_none_is_refused_for_a_remote_endpoint() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings({"PARTNER_CENTER_AUTH": "none", "PARTNER_CENTER_ENDPOINT": "https://api.partnercenter.microsoft.com"})
    assert info.value.setting == "PARTNER_CENTER_AUTH"


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8765", "http://localhost:1", "http://[::1]:9"])
def test_auth_none_is_allowed_on_loopback(endpoint: str) -> None:
    s = load_settings({"PARTNER_CENTER_AUTH": "none", "PARTNER_CENTER_ENDPOINT": endpoint + "/v1/"})
    assert s.auth == "none"
    assert not s.endpoint.endswith("/v1")


def test_replacement_offers_both_forms() -> None:
    s = load_settings({"REPLACEMENT_OFFERS": json.dumps({"sales": {"commercial": NCE, "government": GUID}})})
    assert s.replacement_offers.lookup("sales", "commercial") == NCE
    assert s.replacement_offers.lookup("sales", "government") == GUID
    assert s.replacement_offers.lookup("customer_engagement", "commercial") is None


def test_allow_and_deny_lists() -> None:
    a, b = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"
    s = load_settings({"CUSTOMER_ALLOWLIST": f"{a.upper()}, {b}", "CUSTOMER_DENYLIST": b})
    assert s.customer_in_scope(a)
    assert not s.customer_in_scope(b)  # deny wins
    assert not s.customer_in_scope("33333333-3333-3333-3333-333333333333")
    assert load_settings({}).customer_in_scope(a)


def test_secrets_not_in_repr() -> None:
    s = load_settings({"PARTNER_CENTER_CLIENT_SECRET": "s3cr3t-value", "PARTNER_CENTER_REFRESH_TOKEN": "rt-value",
                       "AzureWebJobsStorage": "AccountKey=k3y"})
    assert "s3cr3t-value" not in repr(s) and "rt-value" not in repr(s) and "k3y" not in repr(s)


def test_cli_reads_local_settings_json_but_the_environment_wins(tmp_path, monkeypatch) -> None:
    import os

    from d365_migration.cli import load_local_settings

    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"IsEncrypted": False, "Values": {"EXPIRY_WINDOW_DAYS": "30", "DRY_RUN": "false"}}))
    monkeypatch.delenv("EXPIRY_WINDOW_DAYS", raising=False)
    monkeypatch.setenv("DRY_RUN", "true")
    assert load_local_settings(path) == ["EXPIRY_WINDOW_DAYS"]
    try:
        assert os.environ["EXPIRY_WINDOW_DAYS"] == "30"
        assert load_settings(dict(os.environ)).dry_run is True  # the environment won
    finally:
        os.environ.pop("EXPIRY_WINDOW_DAYS", None)
    path.write_text("{broken")
    with pytest.raises(ConfigurationError):
        load_local_settings(path)
    assert load_local_settings(tmp_path / "missing.json") == []
