"""Timer → one queue message that starts the chain."""

import json

import azure.functions as func


def main(timer: func.TimerRequest, out: func.Out[str]) -> None:
    out.set(json.dumps({"path": ["start_timer"], "past_due": timer.past_due}))
