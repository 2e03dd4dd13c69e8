"""host.json queue settings, ``%NAME%`` resolution and connection lookup for the local runner."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["HostSettings", "parse_timespan", "resolve_setting_refs"]

_TIMESPAN = re.compile(r"^(?:(?P<d>\d+)\.)?(?P<h>\d+):(?P<m>\d+):(?P<s>\d+(?:\.\d+)?)$")
_REF = re.compile(r"%([^%]+)%")


def parse_timespan(value: Any) -> float:
    """A .NET TimeSpan string (``[d.]hh:mm:ss[.fff]``) or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a TimeSpan: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        m = _TIMESPAN.match(text)
        if m:
            days = int(m["d"] or 0)
            return days * 86400 + int(m["h"]) * 3600 + int(m["m"]) * 60 + float(m["s"])
        try:
            return float(text)
        except ValueError:
            pass
    raise ValueError(f"not a TimeSpan: {value!r}")


def resolve_setting_refs(value: str, env: Mapping[str, str]) -> str:
    """Replace each ``%NAME%`` by the app setting ``NAME``; a missing setting is an error, as in the host."""

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in env:
            raise KeyError(f"app setting {key!r} (referenced as %{key}%) is not set")
        return env[key]

    return _REF.sub(sub, value)


@dataclass(frozen=True)
class HostSettings:
    """The ``extensions.queues`` values of host.json (seconds as floats), with the host's defaults.

    ``min_polling_interval`` and ``message_lease`` are not host.json settings: they are the runner's first
    back-off step after an empty poll and how long a received message stays hidden while its function runs
    (renewed at half-time, like the real host's 10-minute lease), both overridable through ``host_overrides``.
    """

    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    batch_size: int = 16
    new_batch_threshold: int | None = None
    max_dequeue_count: int = 5
    message_encoding: str = "base64"
    function_timeout: float | None = None
    min_polling_interval: float = 0.1
    message_lease: float = 60.0

    _KEYS: ClassVar[dict[str, str]] = {
        "maxPollingInterval": "max_polling_interval",
        "visibilityTimeout": "visibility_timeout",
        "batchSize": "batch_size",
        "newBatchThreshold": "new_batch_threshold",
        "maxDequeueCount": "max_dequeue_count",
        "messageEncoding": "message_encoding",
        "functionTimeout": "function_timeout",
        "minPollingInterval": "min_polling_interval",
        "messageLease": "message_lease",
    }

    @classmethod
    def load(
        cls,
        app_root: Path,
        overrides: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> HostSettings:
        """Read ``app_root/host.json``, then ``AzureFunctionsJobHost__extensions__queues__*`` settings from
        ``env``, then ``overrides`` (camelCase host.json names or the snake_case field names)."""
        raw: dict[str, Any] = {}
        path = Path(app_root) / "host.json"
        if path.is_file():
            doc = json.loads(path.read_text(encoding="utf-8"))
            raw.update((doc.get("extensions") or {}).get("queues") or {})
            if "functionTimeout" in doc:
                raw["functionTimeout"] = doc["functionTimeout"]
        prefix = "azurefunctionsjobhost__extensions__queues__"
        for key, value in (env or {}).items():
            if key.lower().startswith(prefix):
                name = key[len(prefix) :]
                for camel in cls._KEYS:
                    if camel.lower() == name.lower():
                        raw[camel] = value
        raw.update(overrides or {})
        settings = cls()
        names = {f.name for f in fields(cls)}
        for key, value in raw.items():
            attr = cls._KEYS.get(key, key)
            if attr not in names or attr.startswith("_"):
                raise ValueError(f"unknown host setting {key!r}")
            settings = replace(settings, **{attr: cls._coerce(attr, value)})
        if settings.batch_size < 1 or settings.max_dequeue_count < 1:
            raise ValueError("batchSize and maxDequeueCount must be at least 1")
        if settings.message_encoding.lower() not in ("base64", "none"):
            raise ValueError(f"messageEncoding must be base64 or none, not {settings.message_encoding!r}")
        return settings

    @staticmethod
    def _coerce(attr: str, value: Any) -> Any:
        if attr in ("batch_size", "new_batch_threshold", "max_dequeue_count"):
            return None if value is None else int(value)
        if attr == "message_encoding":
            return str(value).lower()
        if attr == "function_timeout" and value is None:
            return None
        return parse_timespan(value)
