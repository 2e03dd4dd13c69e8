"""Queue → $return queue output. Async, non-default scriptFile/entryPoint, relative import."""

import json

import azure.functions as func

from ._helpers import add_step


async def handle(msg: func.QueueMessage) -> str:
    return json.dumps(add_step(msg.get_json(), "relay", msg.dequeue_count))
