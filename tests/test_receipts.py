"""Receipts built from a trace (pure)."""

from __future__ import annotations

from decimal import Decimal

from tokensforge.catalog import ChannelRef, Route
from tokensforge.canonical import Usage
from tokensforge.receipts import Attempt, Trace, build_receipt


def _route(input_price: str, backups: tuple[str, ...]) -> Route:
    return Route(id="m/routed", kind="routed", bucket="routed", input_price=Decimal(input_price),
                 output_price=Decimal("0.24"),
                 channels=(ChannelRef("a", "up"), *(ChannelRef(b, "up") for b in backups)), model_id="m")


def test_a_reloaded_route_with_the_same_id_shows_its_own_prices_and_channels() -> None:
    first, reloaded = _route("0.06", ("b",)), _route("0.07", ("c", "d"))
    for route, price, backups in ((first, "0.06", ["b"]), (reloaded, "0.07", ["c", "d"]), (first, "0.06", ["b"])):
        trace = Trace("req_1", "acc", None, "key", selected_model="m", route=route, usage=Usage(1, 2))
        receipt = build_receipt(trace)
        assert receipt["price"] == {"input_per_mtok": price, "output_per_mtok": "0.24", "cache_read_per_mtok": price,
                                    "cache_write_per_mtok": price, "cache_write_1h_per_mtok": price,
                                    "rounding": "half_up_nano"}
        assert receipt["channels"] == {"primary": "a", "backups": backups, "served_by": None}


def test_receipts_do_not_share_their_backup_lists() -> None:
    trace = Trace("req_1", "acc", None, "key", route=_route("0.06", ("b",)))
    build_receipt(trace)["channels"]["backups"].append("x")
    assert build_receipt(trace)["channels"]["backups"] == ["b"]


def test_fallback_is_reported_when_another_channel_served() -> None:
    trace = Trace("req_1", "acc", None, "key", route=_route("0.06", ("b",)), served_by="b",
                  attempts=[Attempt("a", "5xx", 502), Attempt("b", "ok", 200)])
    assert build_receipt(trace)["fallback"] == {"used": True, "cross_route": False, "from_route": None}
    assert build_receipt(Trace("req_2", "acc", None, "key"))["route"] is None
