"""Always raises (after setting its output, which must not be written). Async, takes context."""

import azure.functions as func


async def main(msg: func.QueueMessage, out: func.Out[str], context: func.Context) -> None:
    out.set(f"should never be written ({context.function_name})")
    raise ValueError(f"always_fails: dequeue_count={msg.dequeue_count}")
