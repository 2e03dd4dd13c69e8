"""HTTP GET /api/status (function key): the ledger as an HTML page, or JSON with ?format=json."""

import json

import azure.functions as func

from d365_migration import get_service
from d365_migration._status import load_status, render_html


async def main(req: func.HttpRequest) -> func.HttpResponse:
    service = get_service()
    doc = await load_status(service.ledger, dry_run=service.settings.dry_run, settings=service.settings)
    wants_json = req.params.get("format") == "json" or "application/json" in req.headers.get("Accept", "")
    if wants_json:
        return func.HttpResponse(json.dumps(doc, indent=2), mimetype="application/json")
    return func.HttpResponse(render_html(doc), mimetype="text/html", charset="utf-8")
