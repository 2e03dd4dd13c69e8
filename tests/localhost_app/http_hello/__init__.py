"""HTTP → greeting; the name comes from the route, the query string or a JSON body."""

import json

import azure.functions as func


def main(req: func.HttpRequest) -> func.HttpResponse:
    name = req.route_params.get("name") or req.params.get("name")
    if not name and req.get_body():
        name = req.get_json().get("name")
    return func.HttpResponse(
        json.dumps({"hello": name or "world", "method": req.method}), mimetype="application/json", status_code=200
    )
