"""``python -m d365_migration consent``: the one-time sign-in that gives the app its refresh token.

Secure Application Model, step 1–3: a person signs in **once**, interactively and with MFA, as the partner's
service account (a user in the partner tenant with the Admin Agent role, or Sales Agent if no license work is
needed). The refresh token from that sign-in is stored in Key Vault; from then on the Function app redeems it
unattended (:class:`d365_migration._auth.AppUserCredential`) and rotates it on every use.

The sign-in uses the **device code flow** (works from any terminal, SSH session or Cloud Shell: you open
https://microsoft.com/devicelogin on any device and type the code) — but run as the *confidential* client, i.e.
the token request carries the app registration's client secret. Why not msal's ``PublicClientApplication``?
A refresh token issued to a public-client flow is bound to it: redeeming it later *with* the client secret (which
the Function app does) fails with ``AADSTS700025`` ("Client is public so neither 'client_assertion' nor
'client_secret' should be presented"). Signing in confidentially yields a refresh token the app can use, and a
leaked refresh token is useless without the client secret. msal only exposes the device flow on
``PublicClientApplication``, so :class:`_ConfidentialDeviceFlowApp` borrows those two methods for a
``ConfidentialClientApplication`` (they only use attributes every msal client application has; msal is pinned).

Prerequisites (app registration, created in Partner Center → Account settings → App management, "web app"):

* a client secret (``PARTNER_CENTER_CLIENT_SECRET``), and its application (client) id
  (``PARTNER_CENTER_CLIENT_ID``); the partner tenant id (``PARTNER_CENTER_TENANT_ID``);
* API permission: *Microsoft Partner Center → user_impersonation* (delegated), with admin consent granted
  (mandatory on US Gov; recommended everywhere, otherwise the sign-in asks for consent);
* "Allow public client flows" is **not** needed for this confidential device flow. If your tenant rejects it
  (``AADSTS7000218``/``AADSTS700025`` during sign-in), check that the secret is right and that the registration is a
  web app; this path has been tested only against the fake Entra in ``tests/_fake_entra.py`` — confirm once in the
  integration sandbox;
* Conditional Access must allow device code flow for the service account, and the account must complete MFA
  (Partner Center rejects App+User tokens without ``mfa`` in ``amr``);
* ``KEY_VAULT_URL`` set, and you (``az login`` / ``DefaultAzureCredential``) need set-secret permission on it
  (*Key Vault Secrets Officer*). The Function app's managed identity needs get **and** set (it writes rotated
  tokens back).
"""

from __future__ import annotations

import base64
import json
import sys
import time
from typing import Any, TextIO

import msal

from ._auth import (
    CLIENT_SECRET_NAME,
    CONSENT_COMMAND,
    PARTNER_CENTER_AUDIENCE,
    PARTNER_CENTER_SCOPE,
    KeyVaultRefreshTokenStore,
    RefreshTokenStore,
    authority_url,
    redact,
    require_app_user_settings,
)
from ._exceptions import AuthenticationError, ConfigurationError
from ._settings import Settings

__all__ = ["run_consent"]


class _ConfidentialDeviceFlowApp(msal.ConfidentialClientApplication):  # type: ignore[misc]
    """A confidential client that can run the device code flow (token polls carry the client secret)."""

    DEVICE_FLOW_CORRELATION_ID = msal.PublicClientApplication.DEVICE_FLOW_CORRELATION_ID
    initiate_device_flow = msal.PublicClientApplication.initiate_device_flow
    acquire_token_by_device_flow = msal.PublicClientApplication.acquire_token_by_device_flow


def _claims(token: str) -> dict[str, Any]:
    """Unverified JWT claims (only to sanity-check what Entra gave us); ``{}`` for opaque tokens."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def run_consent(settings: Settings, *, out: TextIO = sys.stdout, store: RefreshTokenStore | None = None,
                http_client: Any = None, timeout_seconds: float | None = None,
                client_secret_store: KeyVaultRefreshTokenStore | None = None) -> int:
    """Sign the partner service account in with a device code and store its refresh token. Returns 0 or 1.

    :param store: where to save the refresh token; default: Key Vault (``KEY_VAULT_URL``, required then), secret
        ``partner-center-refresh-token``.
    :param client_secret_store: where to save the client secret (which the sign-in has just proved valid); default:
        the same vault, secret ``partner-center-client-secret`` (the app setting ``PARTNER_CENTER_CLIENT_SECRET`` is
        a Key Vault reference to it), but only when ``store`` is the default; ``None`` with a custom ``store``.
    :param http_client: a ``requests.Session`` for msal (tests use it to trust a local certificate).
    :param timeout_seconds: give up waiting for the sign-in after this long (default: the code's own expiry).
    """

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    try:
        require_app_user_settings(settings, need_refresh_token_source=False)
        if store is None and not settings.key_vault_url:
            raise ConfigurationError(
                "KEY_VAULT_URL", "is required by the consent command (the refresh token is stored there)",
                "set KEY_VAULT_URL to the app's vault (https://<name>.vault.azure.net) and run it again")
    except ConfigurationError as exc:
        say(f"Cannot start the sign-in: {exc}")
        return 1
    assert settings.tenant_id and settings.client_id and settings.client_secret
    secret = settings.client_secret
    if store is None:
        assert settings.key_vault_url
        from azure.identity import DefaultAzureCredential

        vault_credential = DefaultAzureCredential()
        store = KeyVaultRefreshTokenStore(settings.key_vault_url, credential=vault_credential)
        if client_secret_store is None:
            client_secret_store = KeyVaultRefreshTokenStore(settings.key_vault_url, secret_name=CLIENT_SECRET_NAME,
                                                            credential=vault_credential)
    where = repr(store)

    try:
        app = _ConfidentialDeviceFlowApp(
            settings.client_id, client_credential=secret,
            authority=authority_url(settings.authority, settings.tenant_id), http_client=http_client,
            instance_discovery=False)
        flow = app.initiate_device_flow(scopes=[PARTNER_CENTER_SCOPE])
    except Exception as exc:
        say(f"Could not reach Entra at {settings.authority}: {type(exc).__name__}: {redact(str(exc), [secret])[:300]}")
        return 1
    if "user_code" not in flow:
        say(f"Entra refused to start a device sign-in: {flow.get('error')}: "
            f"{redact(str(flow.get('error_description', '')), [secret])[:300]}")
        return 1

    say("Sign in ONCE as the partner's Partner Center service account (Admin Agent, with MFA).")
    say(f"  1. Open {flow.get('verification_uri')} in a browser (any device).")
    say(f"  2. Enter the code: {flow['user_code']}")
    say("  3. Sign in as the service account and complete MFA.")
    say(f"Waiting for you to finish (the code expires in {int(flow.get('expires_in', 900)) // 60} minutes)...")
    if timeout_seconds is not None:  # msal polls until flow["expires_at"]
        flow["expires_at"] = min(float(flow.get("expires_at") or "inf"), time.time() + timeout_seconds)
    try:
        result = app.acquire_token_by_device_flow(flow)
    except Exception as exc:
        say(f"The sign-in failed: {type(exc).__name__}: {redact(str(exc), [secret])[:300]}")
        return 1

    refresh_token = result.get("refresh_token")
    access_token = result.get("access_token")
    if "error" in result or not access_token:
        description = redact(str(result.get("error_description", "")), [secret, refresh_token, access_token])
        say(f"The sign-in failed: {result.get('error')}: {description.splitlines()[0][:300] if description else ''}")
        return 1
    if not refresh_token:
        say("Entra returned no refresh token (was the offline_access scope refused?); nothing was stored.")
        return 1

    claims = _claims(str(access_token))
    user = (result.get("id_token_claims") or {}).get("preferred_username") or claims.get("upn") or "(unknown)"
    if claims:
        audience = claims.get("aud")
        if audience not in (PARTNER_CENTER_AUDIENCE, f"{PARTNER_CENTER_AUDIENCE}/"):
            say(f"Unexpected token audience {audience!r} (want {PARTNER_CENTER_AUDIENCE}); nothing was stored.")
            return 1
        if "mfa" not in (claims.get("amr") or []):
            say(f"Signed in as {user}, but WITHOUT multi-factor authentication: Partner Center rejects such tokens. "
                "Enable MFA for the account (Entra MFA; Security defaults or Conditional Access) and run "
                f"`{CONSENT_COMMAND}` again. Nothing was stored.")
            return 1

    try:
        if client_secret_store is not None:
            client_secret_store.put(secret, tags={"clientId": settings.client_id})
        store.save(str(refresh_token))
    except AuthenticationError as exc:
        say(f"Signed in as {user}, but storing the refresh token failed: {exc}")
        return 1
    except Exception as exc:
        say(f"Signed in as {user}, but storing the refresh token failed: {type(exc).__name__}")
        return 1

    say(f"Signed in as {user} (MFA: yes). The refresh token is stored in {where}.")
    if client_secret_store is not None:
        say(f"The client secret is stored in {client_secret_store!r}.")
    say("Next steps:")
    say("  - Nothing else to copy: the Function app reads the token from there (KEY_VAULT_URL) and writes the")
    say("    rotated token back on every use, so it stays valid as long as the app runs at least every 90 days.")
    say("  - If the app had failed with event=auth_failed, it picks the new token up within ~5 minutes (or restart")
    say("    it now).")
    say(f"  - If the account's password changes, MFA is reset or the app stops for 90 days, run `{CONSENT_COMMAND}`")
    say("    again; the alert on event=refresh_token_expiring warns 30 days ahead.")
    return 0
