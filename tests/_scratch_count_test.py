import collections
from hypothesis import settings, HealthCheck
from hypothesis.stateful import run_state_machine_as_test
from tests import test_ledger_stateful as m

COUNTS = collections.Counter()

def test_count(pg, template_db):
    m.LedgerMachine.admin_dsn = pg.admin_dsn("postgres")
    m.LedgerMachine.template = template_db
    orig_run = m.LedgerMachine.run
    def run(self, coro):
        name = coro.cr_code.co_name if hasattr(coro, "cr_code") else str(coro)
        try:
            r = orig_run(self, coro)
            COUNTS[name + ":ok"] += 1
            if name == "expire":
                COUNTS[f"expired:{min(r, 3)}"] += 1
            return r
        except Exception as e:
            COUNTS[name + ":" + type(e).__name__] += 1
            raise
    m.LedgerMachine.run = run
    try:
        run_state_machine_as_test(m.LedgerMachine, settings=settings(max_examples=25, stateful_step_count=30, deadline=None,
            suppress_health_check=list(HealthCheck)))
    finally:
        m.LedgerMachine.run = orig_run
    print(sorted(COUNTS.items()))
