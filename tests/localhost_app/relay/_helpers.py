from typing import Any


def add_step(payload: dict[str, Any], step: str, dequeue_count: int | None) -> dict[str, Any]:
    return {**payload, "path": [*payload["path"], step], "dequeue_count": dequeue_count}
