"""HTTP GET /api/status (function key): the ledger as an HTML page, or JSON with ?format=json.

Reads the ledger only: it works when the Partner Center credential is missing or broken, which is exactly when an
operator needs it."""

import json

import azure.functions as func

from d365_migration import run_status
from d365_migration._status import render_html


async def main(req: func.HttpRequest) -> func.HttpResponse:
    doc = await run_status()
    wants_json = req.params.get("format") == "json" or "application/json" in req.headers.get("Accept", "")
    if wants_json:
        return func.HttpResponse(json.dumps(doc, indent=2), mimetype="application/json")
    return func.HttpResponse(render_html(doc), mimetype="text/html", charset="utf-8")
