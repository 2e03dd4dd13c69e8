"""Screenshot of the status page after a small demo-like run: ``docs/status.png``.

Starts a private Azurite and the Partner Center sandbox (a seeded world, which includes a user without a usage
location, so at least one migration ends ``blocked``), runs detect → purchase → reassign → suspend through the local
host, serves the ``status`` function on a loopback port and photographs it with headless Chromium.

    .venv/bin/python scripts/screenshot_status.py [--out docs/status.png] [--customers 4] [--seed 7]

Needs ``/usr/bin/chromium`` (Debian: ``apt-get install -y chromium``) and ``npm ci`` (for Azurite).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000"]


def find_chromium() -> str:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("Chromium not found: apt-get install -y chromium")


async def shoot(url: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="status-shot-") as profile:
        proc = await asyncio.create_subprocess_exec(
            find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), timeout=90)
        except TimeoutError:
            proc.kill()
            raise SystemExit("Chromium did not finish within 90 s") from None
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"Chromium failed ({proc.returncode}):\n{output.decode(errors='replace')[-2000:]}")


async def main(out: Path, customers: int, seed: int) -> int:
    from d365_tooling.localhost import AzuriteProcess, LocalHost
    from d365_tooling.sandbox import DEMO_REPLACEMENT_OFFERS, SandboxConfig, SandboxServer, SandboxState, seed_world

    state = SandboxState()
    manifest = seed_world(state, customers=customers, seed=seed)
    print(f"seeded {customers} customers: {len(manifest.expected)} expiring qualified subscriptions; "
          f"{len(manifest.users_without_usage_location)} user(s) without a usage location")
    with AzuriteProcess() as azurite, SandboxServer(state, SandboxConfig(provisioning_delay_s=0.5)) as sandbox:
        env = {
            "PARTNER_CENTER_ENDPOINT": sandbox.url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "false",
            "REPLACEMENT_OFFERS": json.dumps(DEMO_REPLACEMENT_OFFERS), "PROVISIONING_POLL_SECONDS": "1",
            "DETECT_SCHEDULE": "0 0 6 * * *", "MAX_PURCHASES_PER_RUN": "1000",
            "PARTNER_CENTER_REQUESTS_PER_MINUTE": "100000", "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": "100000",
        }
        async with LocalHost(REPO, connection_string=azurite.connection_string, env=env,
                             host_overrides={"visibilityTimeout": 0.5, "maxPollingInterval": 0.3}) as host:
            await host.fire_timer("detect_expiring")
            report = await host.run(timeout=240, idle_seconds=1.5)
            print(f"run: {report.invocations} invocations, {report.failures} failed ({report.stopped_because})")
            doc = json.loads((await host.call_http("status", params={"format": "json"})).get_body())
            print("states:", {k: v for k, v in doc["counts"].items() if v})
            if not any(a["state"] == "blocked" for a in doc["attention"]):
                print("warning: no blocked record in this run; the screenshot will not show one")
            base = host.serve_http()
            await shoot(f"{base}/api/status", out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "status.png")
    parser.add_argument("--customers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.out, args.customers, args.seed)))
