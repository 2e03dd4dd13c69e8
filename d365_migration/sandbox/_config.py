"""Runtime configuration of the sandbox (mutable while the server runs)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FaultConfig:
    """Injected faults. All randomness comes from `random.Random(seed)`, so a run is reproducible."""

    seed: int = 0
    error_rate: float = 0.0  # 500/503 with an error body, BEFORE acting
    lose_response_rate: float = 0.0  # writes: apply, then answer 500 or drop the connection
    lose_first_write_response: bool = False  # the first response of every distinct write is lost (after applying)
    reset_rate: float = 0.0  # drop the connection without acting
    timeout_rate: float = 0.0  # sleep `timeout_s` before handling
    timeout_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def reseed(self, seed: int | None = None) -> None:
        if seed is not None:
            self.seed = seed
        self.rng = random.Random(self.seed)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rng"}


@dataclass
class SandboxConfig:
    latency_ms: float = 0.0
    require_auth: bool = False
    requests_per_minute: int | None = None  # customers/subscriptions/orders/carts (one shared budget)
    license_requests_per_minute: int | None = None  # users/licenses/subscribedskus/licenseupdates
    provisioning_delay_s: float = 0.0
    list_lag_s: float = 0.0
    dedupe_request_ids: bool = False
    checkout_duration_s: float = 0.0  # how long a checkout is "being processed" (409 800064 window)
    faults: FaultConfig = field(default_factory=FaultConfig)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "faults"}
        out["faults"] = self.faults.to_json()
        return out

    def apply_patch(self, patch: dict[str, Any]) -> None:
        """Apply a (partial) JSON patch, e.g. `{"latency_ms": 5, "faults": {"error_rate": 0.1}}`."""
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in patch.items():
            if key == "faults":
                if not isinstance(value, dict):
                    raise ValueError("faults must be an object")
                fnames = {f.name for f in dataclasses.fields(self.faults)} - {"rng"}
                for fk, fv in value.items():
                    if fk not in fnames:
                        raise ValueError(f"unknown fault field {fk!r}")
                    setattr(self.faults, fk, fv)
                if "seed" in value:
                    self.faults.reseed()
            elif key in names:
                setattr(self, key, value)
            else:
                raise ValueError(f"unknown config field {key!r}")
