"""Throttling that outlasts the client's retries, in the runner around every record step: a 429 answered after the
client's own tries (Retry-After within what the client sleeps) re-queues the same message after Retry-After instead
of spending the message's deliveries (partner-center/developer/api-throttling-guidance)."""

from __future__ import annotations

from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState
from tests.steps._world import Tenant, detect, drive, mine, queue, service


async def test_throttling_that_outlasts_the_clients_retries_requeues_without_spending_the_delivery(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=1)
    # Two 429s with a short Retry-After: the client (two attempts) gives up with a ThrottledError.
    config = SandboxConfig(long_retry_after_s=1, long_retry_after_path="/subscribedskus", long_retry_after_times=2)
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage) as svc:
            assert svc.client.max_retry_after > 1
            (msg,) = (await detect(svc)).purchase_messages
            result = await svc.run(msg, last_delivery=True)  # the host's last try: it would poison the message
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "detected", record  # not failed
            assert "throttl" in result.note and result.next_messages == []
            q = queue(storage, "purchase-new")
            assert q.get_queue_properties().approximate_message_count == 1  # the same message, delayed
            q.close()
            await drive(svc, [msg.next_poll()])
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    assert len(mine(state, t)) == 1
