"""Fails while dequeue_count <= body["fail_times"], then succeeds; sets its output before failing."""

import json

import azure.functions as func


def main(msg: func.QueueMessage, out: func.Out[str]) -> None:
    payload = msg.get_json()
    metadata = (msg.id, msg.pop_receipt, msg.insertion_time, msg.expiration_time, msg.time_next_visible)
    out.set(json.dumps({"id": payload["id"], "dequeue_count": msg.dequeue_count, "metadata": all(metadata)}))
    if (msg.dequeue_count or 0) <= int(payload["fail_times"]):
        raise RuntimeError(f"flaky: attempt {msg.dequeue_count} fails on purpose")
