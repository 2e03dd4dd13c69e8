"""Queue → a list of messages (one per ``copies``), each recording the path so far. Sync."""

import json
from typing import List

import azure.functions as func


# `Out[List[str]]`, not `Out[list[str]]`: the Python worker rejects the builtin generic as a "non-type
# annotation" (Azure/azure-functions-python-worker#1176), and Azure loads this file with that worker.
def main(msg: func.QueueMessage, out: func.Out[List[str]]) -> None:
    payload = msg.get_json()
    copies = int(payload.get("copies", 1))
    out.set([json.dumps({**payload, "path": [*payload["path"], "echo"], "copy": i}) for i in range(copies)])
