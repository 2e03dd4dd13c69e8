"""Queue → a list of messages (one per ``copies``), each recording the path so far. Sync."""

import json

import azure.functions as func


def main(msg: func.QueueMessage, out: func.Out[list[str]]) -> None:
    payload = msg.get_json()
    copies = int(payload.get("copies", 1))
    out.set([json.dumps({**payload, "path": [*payload["path"], "echo"], "copy": i}) for i in range(copies)])
