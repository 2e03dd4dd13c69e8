"""Policy numbers the steps share, each with the reason it has the value it has.

Settings an operator tunes live in :class:`~d365_migration._settings.Settings` (``PROVISIONING_POLL_SECONDS``,
``PROVISIONING_TIMEOUT_MINUTES``, ``INVOCATION_BUDGET_SECONDS``, ``MAX_PURCHASES_PER_RUN``…); the constants here are
the rules derived from Partner Center's documented behaviour or from the shape of the chain, not knobs.
"""

from __future__ import annotations

from datetime import timedelta

__all__ = [
    "CHECKOUT_IN_PROGRESS_DELAY_SECONDS",
    "CLOCK_SKEW",
    "ETAG_CHANGED_DELAY_SECONDS",
    "ETAG_REJECTED_BACKOFF",
    "ETAG_REJECTIONS_MAX",
    "FAIL_ATTEMPTS",
    "LEASE",
    "MAX_REASSIGN_TRIPS",
    "MIN_BUSY_DELAY_SECONDS",
    "NOT_ENOUGH_LICENSES_POLLS",
    "ORDER_IN_PROGRESS_DELAY_SECONDS",
    "ORDER_LIST_LAG",
    "SCAN_PAGE_BUDGET_SHARE",
    "SCAN_PAGE_MAX",
    "SCAN_PAGE_MIN",
    "SKU_UNKNOWN_POLLS",
    "busy_delay_seconds",
]

# A claim on a record lasts longer than one invocation may run (INVOCATION_BUDGET_SECONDS defaults to 8 minutes), so
# a live worker never loses its lease mid-step; a crashed worker's lease frees the record within minutes.
LEASE = timedelta(minutes=10)

# Another invocation holds the record: look again after a quarter of the provisioning poll (it is usually a duplicate
# delivery finishing the same work), but not sooner than this, so two copies do not spin against each other.
MIN_BUSY_DELAY_SECONDS = 5


def busy_delay_seconds(provisioning_poll_seconds: int) -> int:
    """How long a message waits when its record is busy or changed under it."""
    return max(MIN_BUSY_DELAY_SECONDS, provisioning_poll_seconds // 4)


# Partner Center: "After submission, an order can take up to 15 minutes to appear in the customer's order list."
# The default of LOST_WRITE_RESEND_WAIT_SECONDS: a legacy order, transition or upgrade whose answer we never saw is
# re-sent (same MS-RequestId) only after this long without finding it (steps/purchase.py, steps/native.py).
ORDER_LIST_LAG = timedelta(minutes=15)

# Partner Center's clock and ours may differ a little: something Partner Center created after a recorded attempt may
# carry a creation time slightly before it.
CLOCK_SKEW = timedelta(minutes=2)

# 800060 "your order is in progress": the first request is still being processed; a minute is Partner Center's
# usual processing time for a single-line order.
ORDER_IN_PROGRESS_DELAY_SECONDS = 60

# 800064/800060 on checkout: the cart is being processed; checkout is idempotent per cart, so ask again soon.
CHECKOUT_IN_PROGRESS_DELAY_SECONDS = 30

# 412 / 2055 on the suspend PATCH: someone changed the subscription between our GET and PATCH; re-read at once.
ETAG_CHANGED_DELAY_SECONDS = 1

# ... but every PATCH goes right after a fresh GET, so rejections in a row mean the If-Match itself is refused (its
# format, or something keeps changing the subscription): wait ETAG_CHANGED_DELAY_SECONDS × this factor more after
# each, and block (reason etag_rejected) at the ETAG_REJECTIONS_MAX-th.
ETAG_REJECTED_BACKOFF = 4
ETAG_REJECTIONS_MAX = 4

# How often suspend may send a record back to reassign and have someone really moved again (a user holds the old SKU
# again) before a human must look. Hand-backs after which nobody needed moving (the reported units lag) do not count:
# the suspension waits for the units by time instead (steps/_waits.py).
MAX_REASSIGN_TRIPS = 3

# Polls (PROVISIONING_POLL_SECONDS apart) to wait for a new subscription's product SKU to become readable: the
# provisioning status and subscribed SKUs lag the subscription's activation by minutes.
SKU_UNKNOWN_POLLS = 30

# Polls to wait for the new SKU's units to show as available (subscribed SKUs lag a purchase) before blocking.
NOT_ENOUGH_LICENSES_POLLS = 10

# Customers per scan invocation: each costs one subscriptions call, so a page uses about a quarter of the invocation
# budget at the configured request rate, within these bounds (Partner Center pages customers by at most 500).
SCAN_PAGE_BUDGET_SHARE = 4
SCAN_PAGE_MIN = 20
SCAN_PAGE_MAX = 500

# Marking a record failed when its message is poisoned: re-read and try again this often if it changes meanwhile.
FAIL_ATTEMPTS = 3
