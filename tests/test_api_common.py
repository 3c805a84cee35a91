"""Request helpers shared by the endpoint modules (pure parts)."""

from __future__ import annotations

import re

from tokensforge.api.common import new_request_id


def test_request_ids_are_req_and_24_hex_digits_and_unique_across_batches() -> None:
    ids = [new_request_id() for _ in range(1000)]  # several batches of 256
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)
