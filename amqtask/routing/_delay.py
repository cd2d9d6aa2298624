"""Delays on the broker: power-of-two levels a message walks down. Pure: keys and patterns only.

Level k is a queue whose `x-message-ttl` is 2**k seconds. A delayed message is published with a
routing key that spells its delay in binary, most significant bit first, followed by the target
work queue's name:

    0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.1.images        (5 s, for queue "images")

At level k the exchange routes the message into the level's queue when bit k is 1 (it waits
2**k seconds there, then dead-letters, routing key unchanged, to level k-1), and straight on to
level k-1 when it is 0. After level 0 the deliver exchange routes it to the work queue whose
name ends the key. Every level has one fixed TTL, so messages expire in order and a long delay
never holds up a short one (a per-message TTL would: RabbitMQ expires only at the queue head).

A message passes each level at most once per delay, so the broker's dead-letter cycle detection
(which drops a message dead-lettered into a queue already in its `x-death` history) cannot fire
within one delay; callers must strip `x-death` before delaying a message again.
"""

from __future__ import annotations

import math

DELAY_LEVELS = 20
"""Level k waits 2**k seconds; 20 levels reach 2**20 - 1 s, a little over 12 days."""

MAX_DELAY_SECONDS = (1 << DELAY_LEVELS) - 1


def delay_seconds(seconds: float) -> int:
    """Whole seconds to wait for `seconds`, rounded up so a task never runs early.

    Raises `ValueError` outside 0 < seconds <= MAX_DELAY_SECONDS.
    """
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a delay must be positive, got {seconds!r} s")
    whole = math.ceil(seconds)
    if whole > MAX_DELAY_SECONDS:
        raise ValueError(
            f"a delay of {seconds} s exceeds the longest supported, {MAX_DELAY_SECONDS} s "
            f"({MAX_DELAY_SECONDS / 86400:.1f} days)"
        )
    return whole


def _bit_word(level: int) -> int:
    """Index of level `level`'s bit among the key's words (most significant first)."""
    return DELAY_LEVELS - 1 - level


def delay_routing_key(seconds: int, queue: str) -> str:
    """Routing key that walks a message down the levels for `seconds`, then to `queue`."""
    if not 1 <= seconds <= MAX_DELAY_SECONDS:
        raise ValueError(f"a delay key needs 1..{MAX_DELAY_SECONDS} whole seconds, got {seconds}")
    bits = (str((seconds >> level) & 1) for level in reversed(range(DELAY_LEVELS)))
    return ".".join((*bits, queue))


def level_pattern(level: int, bit: str) -> str:
    """Topic pattern matching keys whose bit for `level` is `bit` ("1": wait; "0": skip)."""
    words = ["*"] * DELAY_LEVELS
    words[_bit_word(level)] = bit
    return ".".join((*words, "#"))


def deliver_pattern(queue: str) -> str:
    """Topic pattern matching keys that end in exactly `queue` after the delay bits."""
    return ".".join(("*",) * DELAY_LEVELS + (queue,))


def level_ttl_ms(level: int) -> int:
    return 1000 << level
