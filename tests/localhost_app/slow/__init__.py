"""Sync and slow (sleeps ``seconds`` from the body): shows that a batch runs in parallel threads."""

import json
import os
import threading
import time

import azure.functions as func


def main(msg: func.QueueMessage, done: func.Out[str]) -> None:
    payload = msg.get_json()
    started = time.monotonic()
    time.sleep(float(payload.get("seconds", 0.3)))
    done.set(json.dumps({"id": payload["id"], "pid": os.getpid(), "thread": threading.get_ident(),
                         "started": started, "ended": time.monotonic()}))
