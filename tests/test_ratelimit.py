"""The pure side of shared rate limits: rate leases spent in memory (ratelimit.LeaseBook)."""

from __future__ import annotations

import pytest

from tokensforge.errors import RateLimited
from tokensforge.ratelimit import IDLE_S, RECHECK_S, Grant, LeaseBook


def _grant(requests: int = 0, tokens: int = 0, *, window: int = 1, left_s: float = 30.0,
           requests_left: int | None = 100, tokens_left: int | None = None) -> Grant:
    return Grant(window, left_s, requests, tokens, requests_left, tokens_left)


def test_a_scope_without_a_lease_asks_the_database_for_one_request() -> None:
    book = LeaseBook()
    assert book.spend("key:a", 10, None, 5, now=0.0) is False
    assert book.need("key:a", 10, None, 5) == (1, 0)
    assert book.need("key:a", None, 100, 30) == (0, 30)


def test_permits_are_spent_in_memory_until_they_run_out() -> None:
    book = LeaseBook()
    book.add("key:a", _grant(requests=3, tokens=100, tokens_left=900), sent_at=0.0, received_at=0.001)
    for _ in range(3):
        assert book.spend("key:a", 10, 1000, 30, now=1.0)
    assert book.held("key:a") == (0, 10)
    assert book.spend("key:a", 10, 1000, 30, now=1.0) is False  # the next one needs the database
    assert book.need("key:a", 10, 1000, 30) == (1, 20)


def test_a_grant_of_the_same_window_adds_and_a_new_window_replaces() -> None:
    book = LeaseBook()
    book.add("key:a", _grant(requests=2), sent_at=0.0, received_at=0.0)
    book.add("key:a", _grant(requests=3), sent_at=1.0, received_at=1.0)
    assert book.held("key:a") == (5, 0)
    book.add("key:a", _grant(requests=1, window=2), sent_at=2.0, received_at=2.0)
    assert book.held("key:a") == (1, 0)  # the old window's permits are worth nothing in the new one


def test_permits_die_with_their_window_measured_from_before_the_database_read_its_clock() -> None:
    book = LeaseBook()
    book.add("key:a", _grant(requests=5, left_s=10.0), sent_at=100.0, received_at=100.2)
    assert book.spend("key:a", 10, None, 1, now=109.9)
    assert book.spend("key:a", 10, None, 1, now=110.0) is False  # sent_at + 10 s: the window may have ended
    assert book.held("key:a") == (0, 0) and len(book) == 0


def test_an_exhausted_window_is_refused_without_the_database_with_an_honest_retry_after() -> None:
    book = LeaseBook()
    book.add("key:a", _grant(requests=0, left_s=12.0, requests_left=0), sent_at=0.0, received_at=0.5)
    with pytest.raises(RateLimited) as info:
        book.spend("key:a", 10, None, 1, now=0.6)
    assert info.value.headers["retry-after"] == "12"  # ceil(0.5 + 12 - 0.6): when the window surely ended
    assert "10 requests per minute" in info.value.message
    # what the database said is trusted only briefly: others may give permits back
    assert book.spend("key:a", 10, None, 1, now=0.5 + RECHECK_S) is False


def test_tokens_refusal_only_when_the_request_cannot_fit_what_is_held_and_left() -> None:
    book = LeaseBook()
    book.add("project:p", _grant(tokens=10, requests_left=None, tokens_left=50), sent_at=0.0, received_at=0.0)
    assert book.spend("project:p", None, 1000, 60, now=0.1) is False  # 10 held + 50 left: ask for 50
    assert book.need("project:p", None, 1000, 60) == (0, 50)
    with pytest.raises(RateLimited) as info:
        book.spend("project:p", None, 1000, 61, now=0.1)
    assert "tokens per minute" in info.value.message
    assert book.spend("project:p", None, 1000, 10, now=0.2)  # a small one still fits what is held


def test_a_request_larger_than_the_limit_can_never_fit() -> None:
    with pytest.raises(RateLimited) as info:
        LeaseBook().spend("key:a", None, 100, 101, now=0.0)
    assert info.value.headers["retry-after"] == "60"


def test_idle_leases_are_given_back_and_dead_ones_dropped() -> None:
    book = LeaseBook()
    book.add("key:busy", _grant(requests=5), sent_at=0.0, received_at=0.0)
    book.add("key:idle", _grant(requests=4, tokens=7), sent_at=0.0, received_at=0.0)
    book.add("key:dead", _grant(requests=3, left_s=0.5), sent_at=0.0, received_at=0.0)
    book.add("key:empty", _grant(requests=1), sent_at=0.0, received_at=0.0)
    assert book.spend("key:empty", 10, None, 1, now=0.1)
    assert book.spend("key:busy", 10, None, 1, now=IDLE_S)
    assert book.idle(now=IDLE_S + 0.1) == [("key:idle", 1, 4, 7)]  # dead: worthless; empty: nothing to give
    assert book.held("key:busy") == (4, 0) and len(book) == 1
    assert book.drain() == [("key:busy", 1, 4, 0)] and len(book) == 0
