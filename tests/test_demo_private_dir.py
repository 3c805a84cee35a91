"""`make run` from a private clone as root: PostgreSQL (run as `postgres`) cannot enter the
requested data dir, so its cluster lives in a home it can reach and the demo says where."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tokensforge.embedded_pg import FALLBACK_ROOTS, EmbeddedPostgres, fallback_home

from .test_demo import Demo, _pg_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another account")

SECRET_FILES = ("demo-key", "admin-token", "demo-upstream-secret")


@pytest.fixture
def private_clone() -> Iterator[Path]:
    """`<fresh tmp dir>/clone`, both mode 0700 and root's, like a clone under /root.

    Afterwards the fallback homes this clone's data dir maps to are stopped and removed too.
    """
    base = Path(tempfile.mkdtemp(prefix="tokensforge-private-"))
    clone = base / "clone"
    clone.mkdir(mode=0o700)
    homes = [fallback_home((clone / ".tokensforge").resolve(), root) for root in FALLBACK_ROOTS]
    try:
        yield clone
    finally:
        for home in homes:
            if (home / "pg" / "postmaster.pid").exists():  # the demo died without stopping it
                EmbeddedPostgres(home).stop()
            shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def _refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_demo_from_a_private_dir_keeps_its_cluster_where_postgres_can_reach_it(private_clone: Path) -> None:
    data_dir = private_clone / ".tokensforge"
    demo = Demo(data_dir, cwd=private_clone)
    try:
        shown = demo.start()
        home = Path(shown["balances"]).parent
        assert home == fallback_home(data_dir.resolve(), home.parent) and home.parent in FALLBACK_ROOTS
        assert not re.search(r"\{[a-z_ ]+\}", demo.output), demo.output  # no placeholder left unfilled
        assert f"cannot traverse {private_clone.parent}" in demo.output  # and it says why
        assert (home / "data-dir").read_text().strip() == str(data_dir.resolve())  # who it belongs to

        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{demo.port}/v1", api_key=shown["key"],
                                      max_retries=0) as client:
            completion = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
        assert completion.choices[0].message.content
        assert completion.model_extra["receipt"]["charge_nanos"] > 0

        assert (data_dir / "demo-key").read_text().strip() == shown["key"]  # the demo's files stay where asked
        assert (data_dir / "demo-catalog.toml").exists() and not (data_dir / "pg").exists()
        for name in SECRET_FILES:
            assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600, name
        pg_port = _pg_port(home)
    finally:
        demo.stop()
    assert demo.proc is not None and demo.proc.returncode in (0, -signal.SIGINT), demo.output
    assert not (home / "pg" / "postmaster.pid").exists() and _refuses_connections(pg_port)  # PostgreSQL stopped
    for private in (private_clone, private_clone.parent):  # nobody widened the user's directories
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
