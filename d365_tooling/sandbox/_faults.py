"""Throttling windows and token classification."""

from __future__ import annotations

import base64
import json
import math
import threading
from collections import deque
from typing import Any


class SlidingWindow:
    """A sliding 60-second request budget. `hit()` returns None if allowed, else Retry-After seconds."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._hits: deque[float] = deque()
        self._lock = threading.Lock()

    def hit(self, now: float, limit: int | None) -> int | None:
        if limit is None:
            return None
        with self._lock:
            while self._hits and self._hits[0] <= now - self.window_s:
                self._hits.popleft()
            if len(self._hits) >= limit:
                if not self._hits:
                    return int(self.window_s)
                wait = self._hits[0] + self.window_s - now
                return max(1, math.ceil(wait))
            self._hits.append(now)
            return None

    def clear(self) -> None:
        with self._lock:
            self._hits.clear()


def jwt_payload(token: str) -> dict[str, Any] | None:
    """The decoded payload of a JWT (no signature check), or None if the token is not a JWT."""
    parts = token.split(".")
    if len(parts) < 2:
        return None
    try:
        seg = parts[1] + "=" * (-len(parts[1]) % 4)
        data = json.loads(base64.urlsafe_b64decode(seg.encode()).decode())
    except Exception:
        return None
    return data if isinstance(data, dict) else None


def is_app_only(token: str) -> bool:
    """App-only when the token is a JWT whose payload has idtyp == "app" or no `scp` claim."""
    payload = jwt_payload(token)
    if payload is None:
        return False
    return payload.get("idtyp") == "app" or "scp" not in payload


def make_token(*, app_only: bool = False, upn: str = "agent@sandboxpartner.onmicrosoft.com") -> str:
    """A fake unsigned JWT for the sandbox (App+User by default)."""

    def enc(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    payload: dict[str, Any] = {"aud": "https://api.partnercenter.microsoft.com", "tid": "sandbox-partner"}
    if app_only:
        payload["idtyp"] = "app"
    else:
        payload.update({"scp": "user_impersonation", "upn": upn, "amr": ["pwd", "mfa"], "idtyp": "user"})
    return f"{enc({'alg': 'none', 'typ': 'JWT'})}.{enc(payload)}.sig"
