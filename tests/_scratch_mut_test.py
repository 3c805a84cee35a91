import pytest
from hypothesis import settings, HealthCheck
from hypothesis.stateful import run_state_machine_as_test
from tests import test_ledger_stateful as m

class Mut(m.LedgerMachine):
    async def _setup(self):
        await super()._setup()
        await self.conn.execute("""CREATE OR REPLACE FUNCTION tf_topup(p_account text, p_bucket text, p_amount bigint, p_key text, p_note text)
RETURNS TABLE (outcome text, entry_seq bigint) LANGUAGE plpgsql AS $$
DECLARE v_balance bigint; v_seq bigint;
BEGIN
    INSERT INTO topups (account_id, idempotency_key, bucket, amount_nanos)
    VALUES (p_account, p_key || random()::text, p_bucket, p_amount);
    INSERT INTO buckets AS b (account_id, bucket, balance_nanos) VALUES (p_account, p_bucket, p_amount)
    ON CONFLICT (account_id, bucket) DO UPDATE SET balance_nanos = b.balance_nanos + EXCLUDED.balance_nanos
    RETURNING b.balance_nanos INTO v_balance;
    INSERT INTO ledger_entries (account_id, bucket, kind, amount_nanos, balance_after_nanos, idempotency_key, note)
    VALUES (p_account, p_bucket, 'topup', p_amount, v_balance, p_key, p_note) RETURNING seq INTO v_seq;
    RETURN QUERY SELECT 'created'::text, v_seq;
END $$""")

class Mut2(m.LedgerMachine):
    async def _setup(self):
        await super()._setup()
        await self.conn.execute("CREATE OR REPLACE FUNCTION tf_expire(p_limit integer) RETURNS integer LANGUAGE sql AS $$ SELECT count(*)::int FROM reservations WHERE status='open' AND expires_at < now() $$")

@pytest.mark.parametrize("cls", [Mut, Mut2])
def test_mut(pg, template_db, cls):
    cls.admin_dsn = pg.admin_dsn("postgres")
    cls.template = template_db
    with pytest.raises(AssertionError) as info:
        run_state_machine_as_test(cls, settings=settings(max_examples=25, stateful_step_count=30, deadline=None, database=None,
            suppress_health_check=list(HealthCheck)))
    print("CAUGHT", str(info.value)[:300])
