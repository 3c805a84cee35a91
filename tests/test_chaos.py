"""The short chaos soak (tests/chaos.py): two gateways, a flaky upstream, a gateway SIGKILL and a database
crash under load, then an exact reconciliation of what clients were shown against the ledger."""

from __future__ import annotations

import pytest

from .chaos import Account, Books, Outcome, Report, SoakConfig, run_soak


async def test_chaos_soak_reconciles_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    report = await run_soak(SoakConfig(duration_s=12, clients=8))
    with capsys.disabled():  # the figures belong in the test's output, also without -s
        print("\n" + report.text())
    assert len(report.outcomes) >= 100, "too little traffic to mean anything"
    assert any(o.kind == "probe" and o.status == 200 and o.ending == "cut" for o in report.outcomes), \
        "the gateway kill cut no stream"
    assert any(o.error_code == "ledger_unavailable" for o in report.outcomes), "the database crash was not felt"
    assert report.recovery_s and report.recovery_s[0] is not None, "no request succeeded after the database returned"
    assert sum(report.drift_nanos.values()) == 0 and all(d == 0 for d in report.drift_nanos.values())
    assert report.ok, "\n".join(report.failures())


def test_reconciliation_flags_what_it_must() -> None:
    """The checks are not vacuous: a shown receipt the ledger lacks, a charged 5xx and the drift they cause."""
    funded = {"credit": 1000, "routed": 0}
    entry = {"id": "le_2", "account_id": "acc", "bucket": "credit", "kind": "charge", "amount_nanos": -30,
             "balance_after_nanos": 970, "request_id": "req_ok"}
    charged_503 = {**entry, "id": "le_3", "amount_nanos": -5, "balance_after_nanos": 965, "request_id": "req_503"}
    books = Books(
        usage={"req_ok": {"request_id": "req_ok", "status": "succeeded", "charge_nanos": 30, "ledger_entry_id": "le_2"},
               "req_503": {"request_id": "req_503", "status": "failed", "charge_nanos": 5, "ledger_entry_id": "le_3"}},
        charges_by_request={"req_ok": [entry], "req_503": [charged_503]},
        entries={"le_2": entry, "le_3": charged_503},
        buckets=[{"account_id": "acc", "bucket": "credit", "balance_nanos": 965, "reserved_nanos": 0, "total": 965},
                 {"account_id": "acc", "bucket": "routed", "balance_nanos": 0, "reserved_nanos": 0, "total": 0}],
        open_reservations=0, other_kinds=[])

    def shown(request_id: str, charge: int, entry_id: str | None) -> Outcome:
        return Outcome("unary", "chaos-mini", None, 0, 0.0, status=200, request_id=request_id, receipt={
            "request_id": request_id, "charge_nanos": charge, "ledger_entry_id": entry_id, "account_id": "acc",
            "bucket": "credit", "status": "succeeded", "balance_after_nanos": 970})

    fine = [shown("req_ok", 30, "le_2"),
            Outcome("unary", "chaos-mini", None, 0, 0.0, status=502, request_id="req_502", error_code="upstream_error")]
    report = Report(SoakConfig(), outcomes=fine)
    assert books.shown_receipts(fine) == [] and books.no_charge_on_errors(fine) == []
    assert books.drift(report, [Account("acc", "k", funded)]) == [] and report.drift_nanos == {"acc": 0}
    assert report.charged_nanos == 35 and report.shown_charged_nanos == 30

    lost = shown("req_lost", 7, "le_9")  # shown to a client, absent from the ledger
    charged_5xx = Outcome("unary", "chaos-mini", None, 0, 0.0, status=503, request_id="req_503",
                          error_code="ledger_unavailable")
    report = Report(SoakConfig(), outcomes=[*fine, lost, charged_5xx])
    assert any("le_9" in v for v in books.shown_receipts(report.outcomes))
    assert any("req_503" in v for v in books.no_charge_on_errors(report.outcomes))
    assert books.drift(report, [Account("acc", "k", funded)]) == ["acc/credit: drift -7 nano-USD"]
    assert report.drift_nanos == {"acc": -7}
