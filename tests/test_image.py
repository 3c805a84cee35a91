"""The container image, built and run: `make image-test` (not part of `make test`: a cold build takes minutes).

deploy/build-image.sh builds deploy/Dockerfile with Docker or Podman (whichever this machine has; Debian's
podman is installed when neither is), on python:3.11-slim where a registry answers, else on a Debian base
made with debootstrap. Then two gateway containers from that image run the way deploy/docker-compose.yml
runs its gateway pair — the same command, the same environment (pooled URL through a real PgBouncer in
transaction mode, the direct URL for migrations and LISTEN, statement cache 0), the example catalog with
its channels pointed at the simulated upstream — against the test suite's throwaway PostgreSQL, after a
`migrate` container; the host's Prometheus (Debian's package) scrapes both with deploy/prometheus's config
and alert rules. Everything shares the host's network (`--network host`): nothing but loopback is used.
Grafana, whose image only a registry has, is not run here.

Timings go to stdout (`make image-test` runs pytest with -s): lines starting `image-test`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from tokensforge.catalog import load_catalog
from tokensforge.embedded_pg import EmbeddedPostgres
from tokensforge.mock_upstream import reply_text

from .harness import ADMIN_TOKEN, UPSTREAM_SECRET, Gw, Mock, free_port
from .invariants import assert_ledger_invariants
from .test_deploy_files import compose_env, service
from .test_pgbouncer import PgBouncer

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MESSAGES = [{"role": "user", "content": "hello from a container"}]
POOLED_APP, DIRECT_APP = "tf-image-pooled", "tf-image-direct"
TIMINGS: dict[str, float] = {}


def _timed(name: str, start: float) -> float:
    TIMINGS[name] = round(time.monotonic() - start, 2)
    print(f"\nimage-test timing: {name} = {TIMINGS[name]} s", flush=True)
    return TIMINGS[name]


@dataclass
class Image:
    engine: list[str]
    name: str
    containers: list[str] = field(default_factory=list)

    @property
    def podman(self) -> bool:
        return self.engine[0] == "podman"

    def cmd(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.engine, *args], capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(self.engine)} {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def run_flags(self) -> list[str]:
        """Host networking; on podman also the ulimits under this host's hard limits (podman's defaults
        exceed them and no container starts). The runc runtime is in `engine` (deploy/ensure-podman.sh)."""
        flags = ["--network", "host"]
        if self.podman:
            flags += ["--ulimit", "nofile=4096:8192", "--ulimit", "nproc=2048:4096"]
        return flags

    def start(self, name: str, env: dict[str, str], args: list[str], *, mounts: dict[str, str],
              stop_timeout: int) -> str:
        self.containers.append(name)
        flags = [*self.run_flags(), "--name", name, "--stop-timeout", str(stop_timeout)]
        for source, target in mounts.items():
            flags += ["-v", f"{source}:{target}:ro"]
        for key, value in env.items():
            flags += ["-e", f"{key}={value}"]
        self.cmd("run", "-d", *flags, self.name, *args)
        return name

    def state(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.cmd("inspect", name).stdout)[0]["State"])

    def logs(self, name: str) -> str:
        proc = self.cmd("logs", name, check=False)
        return proc.stdout + proc.stderr

    def remove_all(self) -> None:
        for name in self.containers:
            self.cmd("rm", "-f", name, check=False, timeout=60)
        self.containers.clear()


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    start = time.monotonic()
    proc = subprocess.run(["bash", str(DEPLOY / "build-image.sh")], capture_output=True, text=True, timeout=1200,
                          check=False, cwd=ROOT, env={**os.environ, "IMAGE": "tokensforge:image-test"})
    assert proc.returncode == 0, f"deploy/build-image.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    _timed("make image (build-image.sh, whatever was cached)", start)
    for line in proc.stderr.splitlines():
        if line.startswith(("build-image:", "ensure-base-image:")):
            print(line)
    engine = subprocess.run(["bash", str(DEPLOY / "ensure-podman.sh")], capture_output=True, text=True,
                            check=True, timeout=600).stdout.split()
    built = Image(engine, proc.stdout.split()[-1])
    try:
        yield built
    finally:
        built.remove_all()


def _inspect_image(image: Image) -> dict[str, Any]:
    return dict(json.loads(image.cmd("image", "inspect", image.name).stdout)[0])


def _pem_blocks(text: str) -> set[str]:
    return set(re.findall(r"-----BEGIN CERTIFICATE-----\n.*?\n-----END CERTIFICATE-----", text, re.S))


def test_the_image_runs_unprivileged_with_a_healthcheck_and_without_the_build_ca(image: Image) -> None:
    meta = _inspect_image(image)
    assert meta["Config"]["User"] == "10001:10001"
    healthcheck = meta.get("Healthcheck") or meta["Config"].get("Healthcheck")
    assert healthcheck and healthcheck["Test"][:3] == ["CMD", "python", "-c"], "HEALTHCHECK lost (OCI format?)"
    print(f"\nimage-test: image {image.name} is {meta['Size'] / 1e6:.0f} MB")
    TIMINGS["image size MB"] = round(meta["Size"] / 1e6)

    probe = image.cmd("run", "--rm", *image.run_flags(), "--entrypoint", "sh", image.name, "-c",
                      "id -u; id -g; test ! -e /run/secrets/ca_bundle && echo no-secret; "
                      "tokensforge --help >/dev/null && echo cli; cat /etc/ssl/certs/ca-certificates.crt")
    uid, gid, secret, cli, *bundle = probe.stdout.splitlines()
    assert (uid, gid, secret, cli) == ("10001", "10001", "no-secret", "cli"), probe.stdout[:300]

    # the build trusted the host's bundle (a build secret); certificates only the host trusts (the TLS
    # proxy's CA) are in no file of the image
    host_bundle = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
    host_only = _pem_blocks(host_bundle.read_text()) - _pem_blocks("\n".join(bundle) + "\n") \
        if host_bundle.is_file() else set()
    if host_only:
        name = f"tf-image-export-{os.getpid()}"
        image.containers.append(name)
        image.cmd("create", "--name", name, image.name)
        with tempfile.TemporaryDirectory() as tmp:
            tar = Path(tmp) / "fs.tar"
            image.cmd("export", "-o", str(tar), name, timeout=300)
            data = tar.read_bytes()
        image.cmd("rm", "-f", name)
        image.containers.remove(name)
        for pem in host_only:
            line = pem.splitlines()[3].encode()  # a 64-character base64 line of the certificate's body
            assert line not in data, "a certificate only the build host trusts is baked into the image"
    print(f"image-test: {len(host_only)} host-only CA certificate(s), none in the image")


def _example_catalog(tmp: Path, mock_url: str) -> Path:
    """deploy/catalog.example.toml with every channel's base_url pointed at the simulated upstream."""
    text = (DEPLOY / "catalog.example.toml").read_text(encoding="utf-8")
    text, count = re.subn(r'(?m)^base_url = "[^"]*"', f'base_url = "{mock_url}"', text)
    assert count >= 3, "the example catalog's channels moved: update this test"
    path = tmp / "catalog.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)  # read by the container's unprivileged user
    return path


def _wait(what: str, check: Any, timeout_s: float, on_fail: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s} s\n{on_fail() if on_fail else ''}")
        time.sleep(0.2)


def _ready(url: str) -> bool:
    with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
        return bool(r.status == 200)


def _healthcheck(image: Image, name: str, url: str) -> None:
    """The image's HEALTHCHECK passes on a serving container (and fails when it cannot reach the gateway)."""
    if image.podman:
        proc = image.cmd("healthcheck", "run", name, check=False)
        assert proc.returncode == 0, f"healthcheck failed: {proc.stdout}{proc.stderr}"
    else:
        _wait(f"{name} healthy", lambda: image.state(name).get("Health", {}).get("Status") == "healthy", 60)
    meta = _inspect_image(image)
    test = (meta.get("Healthcheck") or meta["Config"]["Healthcheck"])["Test"][1:]
    dead = f"http://127.0.0.1:{free_port()}/healthz"
    proc = image.cmd("exec", "-e", f"TOKENSFORGE_HEALTHCHECK_URL={dead}", name, *test, check=False)
    assert proc.returncode != 0, "the HEALTHCHECK command passes against a port where nothing listens"
    proc = image.cmd("exec", "-e", f"TOKENSFORGE_HEALTHCHECK_URL={url}/healthz", name, *test, check=False)
    assert proc.returncode == 0, proc.stderr


async def _chat(client: openai.AsyncOpenAI, *, stream: bool, max_tokens: int = 10,
                started: asyncio.Event | None = None) -> tuple[dict[str, Any], str]:
    """One chat completion through the official SDK, checked against the simulated upstream's answer;
    (receipt, answer id)."""
    if stream:
        chunks = []
        async for chunk in await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True}):
            chunks.append(chunk)
            if started is not None:
                started.set()
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reply_text(max_tokens)
        return dict(chunks[-1].model_extra["receipt"]), chunks[0].id
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                      max_tokens=max_tokens)
    assert completion.choices[0].message.content == reply_text(max_tokens)
    return dict(completion.model_extra["receipt"]), completion.id


class Prometheus:
    """The host's `prometheus` (Debian's package, installed by deploy/ensure-promtool.sh) with
    deploy/prometheus/prometheus.yml and alerts.yml, its compose targets replaced by the containers' ports."""

    def __init__(self, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found: run `make promtool` (Debian's prometheus package)")
        self.dir = Path(tempfile.mkdtemp(prefix="tokensforge-prom-"))
        config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
        config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
        config = config.replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        config = config.replace("- alerts.yml", f"- {DEPLOY / 'prometheus' / 'alerts.yml'}")
        for compose_target, target in zip(["gateway-1:8080", "gateway-2:8080"], targets, strict=True):
            assert compose_target in config, "deploy/prometheus/prometheus.yml's targets moved: update this test"
            config = config.replace(compose_target, target)
        (self.dir / "prometheus.yml").write_text(config)
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = open(self.dir / "log", "w")
        self.proc = subprocess.Popen([binary, f"--config.file={self.dir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={self.dir / 'data'}",
                                      f"--web.listen-address={self.url.removeprefix('http://')}"],
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + "/api/v1/" + path, timeout=2) as r:
            return json.loads(r.read())["data"]

    def log(self) -> str:
        self._log.flush()
        return (self.dir / "log").read_text()[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


async def test_two_gateway_containers_as_compose_runs_them(image: Image, dsn: str, pg: EmbeddedPostgres,
                                                           mock_upstream: Mock, tmp_path: Path) -> None:
    await mock_upstream.reset()
    catalog_path = _example_catalog(tmp_path, mock_upstream.url)
    bouncer = PgBouncer(dsn, pg.bindir / "psql", pool_size=8)
    prometheus: Prometheus | None = None
    gws: list[Gw] = []
    try:
        bouncer.wait_ready()
        # compose's `migrate` service: the image's `migrate` command, straight to PostgreSQL
        start = time.monotonic()
        migrate = service("migrate")
        assert json.loads(mapping_value(migrate, "command")) == ["migrate"]
        image.cmd("run", "--rm", *image.run_flags(), "-e", f"TOKENSFORGE_DATABASE_URL={dsn}", image.name,
                  "migrate", timeout=120)
        _timed("migrate container", start)

        ports = [free_port(), free_port()]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        names = [f"tf-image-gw{i}-{os.getpid()}" for i in (1, 2)]
        start = time.monotonic()
        for i, (name, port) in enumerate(zip(names, ports, strict=True)):
            compose_name = f"gateway-{i + 1}"
            env = _compose_gateway_env(compose_name, dsn, bouncer)
            env["TOKENSFORGE_HEALTHCHECK_URL"] = f"http://127.0.0.1:{port}/healthz"
            env["TOKENSFORGE_SWEEP_INTERVAL_S"] = "0.5"
            args = json.loads(mapping_value(service(compose_name), "command"))
            assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "8080"
            args[args.index("--host") + 1], args[args.index("--port") + 1] = "127.0.0.1", str(port)
            grace = int(mapping_value(service(compose_name), "stop_grace_period").removesuffix("s"))
            image.start(name, env, args, mounts={str(catalog_path): "/etc/tokensforge/catalog.toml"},
                        stop_timeout=grace)
        for name, url in zip(names, urls, strict=True):
            _wait(f"{name} /readyz", lambda url=url, name=name: _alive(image, name) and _ready(url), 90,
                  lambda name=name: image.logs(name))
        _timed("two gateway containers start to /readyz", start)

        start = time.monotonic()
        for name, url in zip(names, urls, strict=True):
            uid = image.cmd("exec", name, "sh", "-c", "id -u; grep ^Uid: /proc/1/status").stdout.split()
            assert uid == ["10001", "Uid:", "10001", "10001", "10001", "10001"], uid
            _healthcheck(image, name, url)
        _timed("user and HEALTHCHECK checks", start)

        start = time.monotonic()
        catalog = load_catalog(catalog_path)
        async with aiohttp.ClientSession() as session:
            gws += [Gw(url, dsn, SimpleNamespace(catalog=catalog), mock_upstream, session)  # type: ignore[arg-type]
                    for url in urls]
            funding = 10**9
            account_id, key = await gws[0].account(credit=funding)  # the admin API of the first container
            charged = 0
            for gw in gws:
                client = gw.client(key)
                for stream in (False, True):
                    receipt, answer_id = await _chat(client, stream=stream)
                    charged += await gw.assert_billed(key, receipt, answer_id)
            assert (await gws[1].balances(key))["credit"]["balance_nanos"] == funding - charged
            await _assert_ledger(dsn, account_id, funding, charged)
            await _assert_connections(dsn, bouncer)
            _timed("admin account, chat and stream through each container, receipts vs ledger", start)

            start = time.monotonic()
            prometheus = Prometheus([url.removeprefix("http://") for url in urls])
            prom = prometheus
            _wait("prometheus scraping both containers", lambda: sorted(
                t["health"] for t in prom.api("targets")["activeTargets"]) == ["up", "up"], 30, prom.log)
            rules = [r["name"] for g in prom.api("rules")["groups"] for r in g["rules"]]
            expected = re.findall(r"(?m)^\s*- alert: (\S+)", (DEPLOY / "prometheus" / "alerts.yml").read_text())
            assert expected and sorted(rules) == sorted(expected), rules
            _timed("prometheus scrapes both, alert rules loaded", start)

            # SIGTERM while streams are in flight: each finishes, with its receipt, then the container exits 0
            await mock_upstream.faults({"chunk_delay_ms": 150})
            start = time.monotonic()
            started = [asyncio.Event() for _ in range(4)]
            streams = [asyncio.create_task(_chat(gws[i % 2].client(key), stream=True, max_tokens=20,
                                                 started=started[i])) for i in range(4)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            signalled = time.monotonic()
            for name in names:
                image.cmd("kill", "--signal", "TERM", name)
            results = await asyncio.wait_for(asyncio.gather(*streams), 60)
            for receipt, _ in results:
                assert receipt["status"] == "succeeded" and receipt["usage"]["completion_tokens"] == 20
                charged += receipt["charge_nanos"]
            for name in names:
                _wait(f"{name} exits", lambda name=name: not _running(image, name), 40,
                      lambda name=name: image.logs(name))
                state = image.state(name)
                assert state["ExitCode"] == 0, f"{name} exited {state['ExitCode']}:\n{image.logs(name)}"
            _timed("SIGTERM to exit of both containers, 4 streams drained", signalled)
            assert time.monotonic() - start > 2.5, "the streams were not in flight long enough to test draining"
            for url in urls:
                with pytest.raises(OSError):
                    _ready(url)
        # every lease and reservation given back; the books still balance (SPEC §5)
        await _assert_ledger(dsn, account_id, funding, charged, drained=True)
        await assert_ledger_invariants(dsn)
    finally:
        await mock_upstream.reset()
        for gw in gws:
            for client in gw.clients:
                await client.close()
        if prometheus is not None:
            prometheus.stop()
        image.remove_all()
        bouncer.stop()


def mapping_value(block: dict[str, str], key: str) -> str:
    assert key in block, f"compose: no {key!r} (have {sorted(block)})"
    return block[key].strip()


def _running(image: Image, name: str) -> bool:
    return bool(image.state(name)["Running"])


def _alive(image: Image, name: str) -> bool:
    """Still running (a container that exited fails at once, with its log)."""
    state = image.state(name)
    assert state["Running"], f"{name} exited with {state['ExitCode']}:\n{image.logs(name)}"
    return True


def _compose_gateway_env(name: str, dsn: str, bouncer: PgBouncer) -> dict[str, str]:
    """The compose service's environment with its hosts mapped to this machine's: pgbouncer:6432 → the
    test's PgBouncer, postgres:5432 → the test cluster; the upstream keys → the simulated upstream's."""
    env = compose_env(name)
    assert {"TOKENSFORGE_DATABASE_URL", "TOKENSFORGE_DIRECT_DATABASE_URL"} <= set(env), env
    assert "@pgbouncer:6432/" in env["TOKENSFORGE_DATABASE_URL"], env
    assert "@postgres:5432/" in env["TOKENSFORGE_DIRECT_DATABASE_URL"], env
    env["TOKENSFORGE_DATABASE_URL"] = bouncer.url(POOLED_APP)
    sep = "&" if "?" in dsn else "?"
    env["TOKENSFORGE_DIRECT_DATABASE_URL"] = f"{dsn}{sep}application_name={DIRECT_APP}"
    env["TOKENSFORGE_ADMIN_TOKEN"] = ADMIN_TOKEN
    for key, value in env.items():
        if value.startswith("${") and key not in ("TOKENSFORGE_ADMIN_TOKEN",):
            env[key] = UPSTREAM_SECRET  # OPENAI_API_KEY, RELAY_A_KEY, RELAY_B_KEY (the catalog's api_key_env)
    assert env["TOKENSFORGE_DB_STATEMENT_CACHE_SIZE"] == "0"
    assert not any("${" in value for value in env.values()), env
    return env


async def _assert_ledger(dsn: str, account_id: str, funding: int, charged: int, *, drained: bool = False) -> None:
    """The account's ledger holds exactly the receipts' charges; once the gateways have stopped, nothing is
    held any more: every request's reservation settled and every process's lease given back."""
    conn = await asyncpg.connect(dsn)
    try:
        entries = await conn.fetch("SELECT kind, amount_nanos FROM ledger_entries WHERE account_id = $1",
                                   account_id)
        assert sum(-e["amount_nanos"] for e in entries if e["kind"] == "charge") == charged
        assert sum(e["amount_nanos"] for e in entries) == funding - charged
        bucket = await conn.fetchrow("SELECT balance_nanos, reserved_nanos FROM buckets WHERE account_id = $1"
                                     " AND bucket = 'credit'", account_id)
        assert bucket["balance_nanos"] == funding - charged
        still_open = await conn.fetch("SELECT kind, amount_nanos FROM reservations WHERE status = 'open'")
        assert bucket["reserved_nanos"] == sum(r["amount_nanos"] for r in still_open)
        if drained:
            assert not still_open, f"held after both gateways stopped: {[dict(r) for r in still_open]}"
            leases = await conn.fetch("SELECT status FROM reservations WHERE kind = 'lease'")
            print(f"image-test: {len(leases)} lease(s) taken, all given back: {sorted({r['status'] for r in leases})}")
    finally:
        await conn.close()


async def _assert_connections(dsn: str, bouncer: PgBouncer) -> None:
    """As compose wires them: each worker's LISTEN straight to PostgreSQL, the pools through PgBouncer."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT pid, application_name, query FROM pg_stat_activity"
                                " WHERE datname = current_database() AND application_name = ANY($1::text[])",
                                [POOLED_APP, DIRECT_APP])
    finally:
        await conn.close()
    direct = [r for r in rows if r["application_name"] == DIRECT_APP]
    assert len(direct) == 4 and all(r["query"].startswith("LISTEN") for r in direct), [dict(r) for r in rows]
    pooled = {r["pid"] for r in rows if r["application_name"] == POOLED_APP}
    assert pooled and pooled <= bouncer.server_pids()
