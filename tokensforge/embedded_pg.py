"""Embedded PostgreSQL: a private cluster under the gateway's data dir.

Used when no TOKENSFORGE_DATABASE_URL is given (`tokensforge serve`/`demo`) and by
the test suite (one throwaway cluster per session). The cluster lives in
`<data_dir>/pg`, its log in `<data_dir>/pg.log`; clients always connect over TCP
loopback as the trust-authenticated superuser `tokensforge`.

Root: PostgreSQL refuses to run as root, so when euid is 0 every server-side
binary (initdb, pg_ctl, hence postgres) runs as the `postgres` account through
`runuser`. Whatever the server must write (cluster dir, log file, socket dir) is
chowned to that account, and every directory above the cluster must be
traversable by it; that is checked up front so the failure names the directory
instead of surfacing as an opaque initdb error.

A clone in a private directory (under /root, or any mode-0700 dir) is such a
case. `cluster_home()` then picks a home the account can reach instead, under
/var/lib/tokensforge (or /tmp/tokensforge-clusters), named after the requested
dir so every restart finds the same cluster. The user's directories are never
chmodded.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

log = logging.getLogger(__name__)

BINDIR_ENV = "TOKENSFORGE_PG_BINDIR"
SUPERUSER = "tokensforge"
DATABASE = "tokensforge"
PG_ACCOUNT = "postgres"
#: every binary start() needs; a candidate bindir missing any of them is skipped
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres", "psql", "createdb")
#: Debian/Ubuntu layout, searched last (highest major version first)
DISTRO_BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
#: sizeof(sockaddr_un.sun_path) is 108 on Linux, including the trailing NUL
MAX_SOCKET_PATH = 107
#: pg_ctl's own wait (-t); the subprocess timeout leaves it room to report
PG_CTL_WAIT_SECONDS = 60
_NON_DURABLE = ("-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off")
_SERVER_SETTINGS = ("-c max_connections=300", "-c shared_buffers=128MB")
_PORT_ATTEMPTS = 3
#: where a cluster goes when the server account cannot reach the requested data dir; the
#: first usable one wins (/var/lib survives reboots, /tmp is there when /var/lib is read-only)
FALLBACK_ROOTS = (Path("/var/lib/tokensforge"), Path("/tmp/tokensforge-clusters"))
#: written into a fallback home: which data dir it serves (for whoever cleans up later)
ORIGIN_FILE = "data-dir"
_FIX_HINT = f"run deploy/ensure-postgres.sh or set {BINDIR_ENV} to the directory holding initdb"


class PostgresNotFound(RuntimeError):
    """No usable PostgreSQL installation (initdb, pg_ctl, ...) was found."""


class EmbeddedPostgresError(RuntimeError):
    """The embedded cluster could not be prepared, started, stopped or queried."""


# --------------------------------------------------------------------------- binaries


def find_pg_bindir() -> Path:
    """Locate the PostgreSQL bin directory: env, PATH, pg_config, distro dirs.

    An explicit TOKENSFORGE_PG_BINDIR that is unusable is an error rather than a
    silent fall-through, so a typo never picks up some other installation.
    """
    explicit = os.environ.get(BINDIR_ENV)
    if explicit:
        return validate_bindir(Path(explicit), source=BINDIR_ENV)
    for candidate in _bindir_candidates():
        if not _missing_binaries(candidate):
            return candidate
    raise PostgresNotFound(
        f"PostgreSQL binaries ({', '.join(REQUIRED_BINARIES)}) not found on PATH, via pg_config, "
        f"or under {DISTRO_BINDIR_GLOB}: {_FIX_HINT}"
    )


def validate_bindir(bindir: Path, *, source: str = "bindir") -> Path:
    """Return `bindir` made absolute, or raise naming the binaries it lacks."""
    missing = _missing_binaries(bindir)
    if missing:
        raise PostgresNotFound(
            f"{source}={bindir} is not a usable PostgreSQL bin directory "
            f"(missing or not executable: {', '.join(missing)}): {_FIX_HINT}"
        )
    return bindir.absolute()


def _missing_binaries(bindir: Path) -> list[str]:
    return [name for name in REQUIRED_BINARIES if not _is_executable(bindir / name)]


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _bindir_candidates() -> list[Path]:
    """Candidate dirs in search order; symlinks (e.g. /usr/local/bin/initdb) are resolved."""
    candidates: list[Path] = []
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        candidates.append(Path(initdb).resolve().parent)
        candidates.append(Path(initdb).parent)
    pg_config_dir = _pg_config_bindir()
    if pg_config_dir is not None:
        candidates.append(pg_config_dir)
    candidates.extend(sorted(Path("/").glob(DISTRO_BINDIR_GLOB.lstrip("/")), key=_version_key,
                             reverse=True))
    return candidates


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _version_key(bindir: Path) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin: numeric, so 10 beats 9.6."""
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (-1,)


# --------------------------------------------------------------------------- root handling


@dataclass(frozen=True)
class _Account:
    """The unprivileged account the server runs as when we are root."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]


def _server_account() -> _Account | None:
    """None when not root (server runs as us); else the `postgres` account, created if absent."""
    if os.geteuid() != 0:
        return None
    if shutil.which("runuser") is None:
        raise EmbeddedPostgresError(
            "running as root needs `runuser` (util-linux) to start PostgreSQL as "
            f"{PG_ACCOUNT!r}; install util-linux or run as a non-root user"
        )
    try:
        entry = pwd.getpwnam(PG_ACCOUNT)
    except KeyError:
        entry = _create_account()
    groups = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)


def _create_account() -> pwd.struct_passwd:
    log.warning("creating system user %r to run the embedded PostgreSQL", PG_ACCOUNT)
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_ACCOUNT],
                       capture_output=True, text=True, timeout=30, check=True)
        return pwd.getpwnam(PG_ACCOUNT)
    except (OSError, subprocess.SubprocessError, KeyError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        raise EmbeddedPostgresError(
            f"running as root, PostgreSQL must run as user {PG_ACCOUNT!r}, which does not exist "
            f"and could not be created with useradd ({detail}); create it or run as non-root"
        ) from exc


def _can_traverse(path: Path, account: _Account) -> bool:
    st = path.stat()
    if st.st_uid == account.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in account.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _blocked_dir(directory: Path, account: _Account) -> Path | None:
    """The outermost directory on the way to `directory` the server cannot enter, or None.

    `os.access` answers for root, not for the server account, hence the mode arithmetic.
    Components that do not exist yet are skipped: whoever creates them decides their mode.
    """
    chains = {directory.absolute(), directory.resolve()}
    for path in sorted({p for chain in chains for p in (chain, *chain.parents)}, key=_depth):
        if path.exists() and not _can_traverse(path, account):
            return path
    return None


def _check_traversable(directory: Path, account: _Account) -> None:
    """Fail naming the first directory on the way to `directory` the server cannot enter."""
    path = _blocked_dir(directory, account)
    if path is not None:
        raise EmbeddedPostgresError(
            f"PostgreSQL runs as {account.name!r} (we are root) but cannot traverse {path} "
            f"(mode {stat.filemode(path.stat().st_mode)}): `chmod o+x {path}` or choose a "
            "data dir outside it"
        )


def _depth(path: Path) -> int:
    """Sort key: ancestors are checked top-down so the outermost culprit is named."""
    return len(path.parts)


def _chown(path: Path, account: _Account | None) -> None:
    if account is not None:
        os.chown(path, account.uid, account.gid)


# --------------------------------------------------------------------------- where the cluster lives


@dataclass(frozen=True)
class ClusterHome:
    """Where the cluster for a requested data dir lives (`<path>/pg`, `<path>/pg.log`).

    `path` is the requested dir itself unless the server account cannot reach it;
    then `reason` says why it is elsewhere (for the log and the demo banner).
    """

    requested: Path
    path: Path
    reason: str | None = None

    @property
    def cluster_dir(self) -> Path:
        return self.path / "pg"

    @property
    def moved(self) -> bool:
        return self.path != self.requested


def fallback_home(requested: Path, root: Path) -> Path:
    """The home under `root` for the absolute dir `requested`: a readable tail plus a hash of the path.

    Pure, so the same clone always maps to the same cluster, and two clones whose
    paths end alike (two `app/.tokensforge`) never share one.
    """
    digest = hashlib.sha256(os.fsencode(requested)).hexdigest()[:12]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(requested.parts[-2:])).strip("._-")[:32]
    return root / (f"{tail}-{digest}" if tail else digest)


def cluster_home(requested: Path, *, roots: Sequence[Path] = FALLBACK_ROOTS) -> ClusterHome:
    """Where to keep the cluster for data dir `requested`; see the module doc."""
    return _choose_home(requested, _server_account(), roots)


def _choose_home(requested: Path, account: _Account | None, roots: Sequence[Path]) -> ClusterHome:
    """The requested dir if the server can reach it (or already keeps a cluster there), else a
    fallback home: the one an earlier run made for this dir, or a new one under the first usable root.
    """
    requested = requested.resolve()
    if account is None:
        return ClusterHome(requested, requested)
    blocked = _blocked_dir(requested, account)
    if blocked is None and _has_cluster(requested):
        return ClusterHome(requested, requested)
    reason = f"an earlier run kept the cluster for {requested} there"
    if blocked is not None:
        reason = (f"PostgreSQL runs as {account.name!r} (we are root) and cannot traverse {blocked} "
                  f"(mode {stat.filemode(blocked.stat().st_mode)})")
        if _has_cluster(requested):
            reason += f"; the cluster in {requested / 'pg'} is left as it is (make {blocked} traversable to use it)"
    earlier = next((h for h in (fallback_home(requested, r) for r in roots) if _has_cluster(h)), None)
    if earlier is not None:  # sticky: a later chmod must not swap the balances for an empty cluster
        return ClusterHome(requested, earlier, reason)
    if blocked is None:
        return ClusterHome(requested, requested)
    problems = []
    for root in roots:
        home = fallback_home(requested, root)
        try:
            _make_home(home, account, requested)
        except (OSError, EmbeddedPostgresError) as exc:
            problems.append(f"{home}: {exc}")
            continue
        return ClusterHome(requested, home, reason)
    raise EmbeddedPostgresError(f"{reason}, and no fallback home is usable ({'; '.join(problems)}): "
                                f"`chmod o+x {blocked}` or choose a data dir outside it")


def _has_cluster(home: Path) -> bool:
    return (home / "pg" / "PG_VERSION").exists()


def _make_home(home: Path, account: _Account, requested: Path) -> None:
    """`home` (mode 0700, the server's) under a root-owned root (0711: enterable, not listable).

    Roots may sit in world-writable /tmp, so an existing root or home must be a real
    directory (no symlink) owned by us or the server account, and not writable by others.
    """
    try:
        home.parent.mkdir()
        os.chmod(home.parent, 0o711)  # whatever the umask: the server account must enter it
    except FileExistsError:
        pass
    _check_owned(home.parent, {os.geteuid()})
    try:
        home.mkdir(mode=0o700)
    except FileExistsError:
        pass
    _check_owned(home, {os.geteuid(), account.uid})
    _chown(home, account)
    blocked = _blocked_dir(home, account)
    if blocked is not None:
        raise EmbeddedPostgresError(f"{account.name!r} cannot traverse {blocked}")
    (home / ORIGIN_FILE).write_text(f"{requested}\n")


def _check_owned(path: Path, owners: set[int]) -> None:
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in owners or st.st_mode & 0o022:
        raise EmbeddedPostgresError(
            f"{path} is not a directory owned by uid {sorted(owners)} and writable only by its owner "
            f"({stat.filemode(st.st_mode)}, uid {st.st_uid}); remove it or fix it"
        )


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A currently free loopback TCP port (the kernel's pick; racy but good enough)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """Our env minus PG* (PGHOST, PGDATA... would redirect the tools) with C messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


def _tmp_root() -> str:
    """/tmp itself: short (socket paths) and world-traversable, unlike pytest's tmp dirs."""
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------- the cluster


class EmbeddedPostgres:
    """One private PostgreSQL cluster in `<data_dir>/pg`, reachable over 127.0.0.1.

    `start()` initialises the cluster on first use, starts it and makes sure the
    `tokensforge` database exists; `stop()` is idempotent, and stop() then start()
    on the same instance reuses the same port. If the cluster is found running
    when this instance did not start it (a gateway killed without cleanup), it is
    stopped and restarted with this instance's settings: the data dir is private
    to one gateway, so a leftover server is never shared.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, bindir: Path | None = None,
                 durable: bool = True) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.cluster_dir = self.data_dir / "pg"
        self.log_path = self.data_dir / "pg.log"
        self.bindir = validate_bindir(Path(bindir)) if bindir is not None else find_pg_bindir()
        self.durable = durable
        self._port = port
        #: an auto-picked port may be re-picked until the first successful start, then it
        #: sticks so stop()/start() keeps the DSN valid (outage tests rely on that)
        self._port_fixed = port is not None
        self._started = False
        self._socket_dir: Path | None = None
        self._owns_data_dir = False
        self._account = _server_account()

    @classmethod
    def throwaway(cls, *, port: int | None = None, bindir: Path | None = None) -> EmbeddedPostgres:
        """A non-durable cluster in a fresh dir directly under /tmp, removed by close().

        Directly under /tmp because pytest's tmp dirs are 0700 root-owned, which the
        `postgres` account could not traverse.
        """
        data_dir = Path(tempfile.mkdtemp(prefix="tokensforge-pg-", dir=_tmp_root()))
        try:
            _chown(data_dir, _server_account())
            pg = cls(data_dir, port=port, bindir=bindir, durable=False)
        except BaseException:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
        pg._owns_data_dir = True
        return pg

    # ----------------------------------------------------------------- public API

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedPostgresError("no port yet: call start() first")
        return self._port

    @property
    def dsn(self) -> str:
        """asyncpg-ready DSN for the `tokensforge` database."""
        return self.admin_dsn(DATABASE)

    def admin_dsn(self, dbname: str) -> str:
        """DSN for any database of this cluster, as the superuser (tests create several)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def start(self) -> str:
        """Initialise if needed, start, ensure the `tokensforge` database; return its DSN."""
        if self._started and self.is_running():
            return self.dsn
        self._prepare_dirs()
        if not (self.cluster_dir / "PG_VERSION").exists():
            self._initdb()
        self._check_version()
        if self.is_running():
            log.warning("embedded PostgreSQL in %s was left running; restarting it", self.cluster_dir)
            self._pg_ctl_stop()
        self._start_server()
        self._started = True
        try:
            self._ensure_database()
        except BaseException:
            self.stop()
            raise
        return self.dsn

    def stop(self) -> None:
        """Stop the server if it runs (fast shutdown: sessions are cut, data is kept)."""
        if self.is_running():
            self._pg_ctl_stop()
        self._started = False
        self._drop_socket_dir()

    def close(self) -> None:
        """stop(), then remove the data dir if it is a throwaway one."""
        self.stop()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def is_running(self) -> bool:
        """What `pg_ctl status` says about this data dir (not just this instance)."""
        if not (self.cluster_dir / "PG_VERSION").exists():
            return False
        proc = self._run([self._bin("pg_ctl"), "status", "-D", str(self.cluster_dir)],
                         as_server=True, timeout=30)
        if proc.returncode in (0, 3):
            return proc.returncode == 0
        raise EmbeddedPostgresError(
            f"pg_ctl status -D {self.cluster_dir} failed (exit {proc.returncode}): "
            f"{_tail(proc.stderr + proc.stdout)}"
        )

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self.data_dir)!r}, port={self._port}, durable={self.durable})"

    # ----------------------------------------------------------------- preparation

    def _prepare_dirs(self) -> None:
        """Create what the server writes, owned by the server account, and check the path."""
        if not self.data_dir.exists():
            self.data_dir.mkdir(parents=True)
            if self._account is not None:  # a 077 umask would lock `postgres` out of its log
                os.chmod(self.data_dir, stat.S_IMODE(self.data_dir.stat().st_mode) | 0o711)
        self.cluster_dir.mkdir(mode=0o700, exist_ok=True)
        self.log_path.touch(exist_ok=True)
        if self._account is None:
            return
        _check_traversable(self.data_dir, self._account)
        owner = self.cluster_dir.stat().st_uid
        if owner not in (0, self._account.uid):
            raise EmbeddedPostgresError(
                f"{self.cluster_dir} belongs to uid {owner}, not {self._account.name!r}; "
                "PostgreSQL requires its data dir to be owned by the server account"
            )
        _chown(self.cluster_dir, self._account)
        _chown(self.log_path, self._account)

    def _initdb(self) -> None:
        """Create the cluster; throwaway ones skip fsync since they never outlive a crash."""
        cmd = [self._bin("initdb"), "-D", str(self.cluster_dir), "--auth=trust", "-U", SUPERUSER,
               "--encoding=UTF8", "--locale=C"]
        if not self.durable:
            cmd.append("--no-sync")
        self._check(self._run(cmd, as_server=True, timeout=300), "initdb")

    def _check_version(self) -> None:
        """Refuse a cluster made by another major version with a message, not a log line."""
        cluster = (self.cluster_dir / "PG_VERSION").read_text().strip()
        proc = self._check(self._run([self._bin("postgres"), "--version"], as_server=False,
                                     timeout=30), "postgres --version")
        match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", proc.stdout)
        if match is None:
            raise EmbeddedPostgresError(f"cannot parse postgres --version: {proc.stdout!r}")
        major = match.group(1) if int(match.group(1)) >= 10 else f"{match.group(1)}.{match.group(2)}"
        if major != cluster:
            raise EmbeddedPostgresError(
                f"{self.cluster_dir} was created by PostgreSQL {cluster} but {self.bindir} is "
                f"PostgreSQL {major}: set {BINDIR_ENV} to a {cluster} install, or move the "
                "directory away to start afresh (its data would need pg_upgrade)"
            )

    def _make_socket_dir(self, port: int) -> Path:
        """`<data_dir>/run`, or a short dir under /tmp when the socket path would be too long."""
        run_dir = self.data_dir / "run"
        if len(os.fsencode(run_dir / f".s.PGSQL.{port}")) <= MAX_SOCKET_PATH:
            run_dir.mkdir(mode=0o700, exist_ok=True)
        else:
            run_dir = Path(tempfile.mkdtemp(prefix="tokensforge-sock-", dir=_tmp_root()))
        _chown(run_dir, self._account)
        return run_dir

    def _drop_socket_dir(self) -> None:
        if self._socket_dir is not None and self._socket_dir != self.data_dir / "run":
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        self._socket_dir = None

    # ----------------------------------------------------------------- server control

    def _start_server(self) -> None:
        """pg_ctl start; an auto-picked port lost to a race is re-picked a few times."""
        attempts = 1 if self._port_fixed else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if self._port is None or attempt > 1:
                self._port = free_port()
            try:
                self._pg_ctl_start(self.port)
                self._port_fixed = True
                return
            except _PortInUse:
                if attempt == attempts:
                    raise EmbeddedPostgresError(
                        f"port {self.port} on 127.0.0.1 is in use; see {self.log_path}"
                    ) from None
                log.info("port %d taken, retrying with another", self.port)

    def _pg_ctl_start(self, port: int) -> None:
        self._drop_socket_dir()
        self._socket_dir = self._make_socket_dir(port)
        log_offset = self.log_path.stat().st_size
        proc = self._run([self._bin("pg_ctl"), "start", "-D", str(self.cluster_dir), "-w",
                          "-t", str(PG_CTL_WAIT_SECONDS), "-l", str(self.log_path),
                          "-o", self._server_options(port, self._socket_dir)],
                         as_server=True, timeout=PG_CTL_WAIT_SECONDS + 30)
        if proc.returncode == 0:
            return
        server_log = self._read_log_from(log_offset)
        if self.is_running():  # e.g. pg_ctl gave up waiting: do not leak the server
            self._pg_ctl_stop()
        self._drop_socket_dir()
        if "could not bind" in server_log or "Address already in use" in server_log:
            raise _PortInUse(port)
        raise EmbeddedPostgresError(
            f"pg_ctl start failed (exit {proc.returncode}) for {self.cluster_dir}:\n"
            f"{_tail(proc.stderr + proc.stdout)}\n--- {self.log_path} ---\n{_tail(server_log)}"
        )

    def _server_options(self, port: int, socket_dir: Path) -> str:
        """The `-o` string; pg_ctl hands it to /bin/sh, hence the quoting."""
        options = [f"-p {port}", f"-k {shlex.quote(str(socket_dir))}", "-h 127.0.0.1"]
        if not self.durable:
            options.extend(_NON_DURABLE)
        options.extend(_SERVER_SETTINGS)
        return " ".join(options)

    def _pg_ctl_stop(self) -> None:
        proc = self._run([self._bin("pg_ctl"), "stop", "-D", str(self.cluster_dir), "-m", "fast",
                          "-w", "-t", str(PG_CTL_WAIT_SECONDS)],
                         as_server=True, timeout=PG_CTL_WAIT_SECONDS + 30)
        if proc.returncode != 0 and self.is_running():
            raise EmbeddedPostgresError(
                f"pg_ctl stop failed (exit {proc.returncode}) for {self.cluster_dir}: "
                f"{_tail(proc.stderr + proc.stdout)}"
            )

    def _ensure_database(self) -> None:
        """Create the `tokensforge` database once; the client tools need no special user."""
        query = f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
        proc = self._check(self._run(
            [self._bin("psql"), "-X", "-q", "-t", "-A", *self._client_args(), "-d", "postgres",
             "-c", query], as_server=False, timeout=60), "psql")
        if proc.stdout.strip() == "1":
            return
        self._check(self._run([self._bin("createdb"), *self._client_args(), DATABASE],
                              as_server=False, timeout=60), "createdb")

    def _client_args(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER]

    # ----------------------------------------------------------------- plumbing

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _run(self, cmd: list[str], *, as_server: bool, timeout: float
             ) -> subprocess.CompletedProcess[str]:
        """Run a tool (as the server account when root and `as_server`) from `/`.

        cwd `/` because root's cwd (e.g. /root, mode 0700) is not enterable by `postgres`.
        """
        if as_server and self._account is not None:
            cmd = ["runuser", "-u", self._account.name, "--", *cmd]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd="/",
                                  timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedPostgresError(f"{shlex.join(cmd)} timed out after {timeout}s") from exc
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot run {shlex.join(cmd)}: {exc}") from exc

    @staticmethod
    def _check(proc: subprocess.CompletedProcess[str], what: str
               ) -> subprocess.CompletedProcess[str]:
        if proc.returncode != 0:
            raise EmbeddedPostgresError(
                f"{what} failed (exit {proc.returncode}): {_tail(proc.stderr + proc.stdout)}"
            )
        return proc

    def _read_log_from(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""


class _PortInUse(Exception):
    """Internal: the server could not bind its port (lets start() re-pick one)."""


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m tokensforge.embedded_pg --data-dir D`: run a cluster until Ctrl-C/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m tokensforge.embedded_pg", description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path(".tokensforge"))
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with EmbeddedPostgres(args.data_dir, port=args.port) as pg:
            print(pg.dsn, flush=True)
            signal.pause()
    except KeyboardInterrupt:
        pass
    except (PostgresNotFound, EmbeddedPostgresError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
