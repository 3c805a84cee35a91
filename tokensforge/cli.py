"""The `tokensforge` command (SPEC §4)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import uvloop

from . import archive, mock_upstream, research_cli
from .catalog import CatalogError, load_catalog
from .db import migrate
from .demo import run_demo
from .embedded_pg import EmbeddedPostgresError, PostgresNotFound
from .server import database, serve_forever, serve_workers
from .settings import Settings


def _common(parser: argparse.ArgumentParser, *, port: int = 8080) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--data-dir", type=Path, default=Path(".tokensforge"),
                        help="embedded PostgreSQL lives here when TOKENSFORGE_DATABASE_URL is unset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensforge", description="OpenAI-compatible gateway with a real ledger")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="catalog TOML (or TOKENSFORGE_CONFIG)")
    serve.add_argument("--workers", type=int, default=1)
    _common(serve)

    demo = sub.add_parser("demo", help="embedded database, simulated upstream, funded demo account")
    _common(demo)

    migrate_cmd = sub.add_parser("migrate", help="apply database migrations")
    migrate_cmd.add_argument("--data-dir", type=Path, default=Path(".tokensforge"))

    research = sub.add_parser("research", help="write, list (--list) or show (--show ID) research reports "
                              "through a running gateway")
    research_cli.add_arguments(research)

    mock = sub.add_parser("mock-upstream", help="the simulated OpenAI-compatible upstream")
    mock_upstream.add_arguments(mock)

    keep = os.environ.get("TOKENSFORGE_HISTORY_RETENTION_MONTHS")
    arch = sub.add_parser("archive", help="move closed months of usage and ledger history to checksummed files")
    arch.add_argument("--keep-months", type=int, default=int(keep) if keep else 12,
                      help="closed months kept in the database (TOKENSFORGE_HISTORY_RETENTION_MONTHS; default 12)")
    arch.add_argument("--dir", type=Path, default=Path(os.environ.get("TOKENSFORGE_ARCHIVE_DIR", "archive")),
                      help="where the .jsonl.gz files and their manifests go (TOKENSFORGE_ARCHIVE_DIR)")
    arch.add_argument("--data-dir", type=Path, default=Path(".tokensforge"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "mock-upstream":
        return mock_upstream.run_from_args(args)
    if args.command == "research":
        return asyncio.run(research_cli.run(args))
    try:
        return _dispatch(args)
    except CatalogError as exc:
        print(f"tokensforge: bad catalog: {exc}", file=sys.stderr)
        return 2
    except (PostgresNotFound, EmbeddedPostgresError) as exc:
        print(f"tokensforge: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        settings = Settings.from_env(config_path=args.config, host=args.host, port=args.port,
                                     data_dir=args.data_dir, workers=args.workers)
        if settings.config_path is None:
            print("tokensforge: serve needs --config FILE or TOKENSFORGE_CONFIG", file=sys.stderr)
            return 2
        catalog = load_catalog(settings.config_path)
        with database(settings) as db:
            if settings.workers > 1:
                asyncio.run(migrate(settings.direct_dsn(db.dsn)))  # once, before the workers race for the lock
                return serve_workers(settings, db.dsn)
            uvloop.run(serve_forever(settings, catalog, db.dsn))
        return 0
    if args.command == "demo":
        settings = Settings.from_env(host=args.host, port=args.port, data_dir=args.data_dir)
        with database(settings) as db:
            uvloop.run(run_demo(settings, db))
        return 0
    if args.command == "migrate":
        settings = Settings.from_env(data_dir=args.data_dir)
        with database(settings) as db:
            applied = asyncio.run(migrate(settings.direct_dsn(db.dsn)))
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
        return 0
    if args.command == "archive":
        settings = Settings.from_env(data_dir=args.data_dir)
        with database(settings) as db:
            done = asyncio.run(archive.archive(settings.direct_dsn(db.dsn), keep_months=args.keep_months,
                                               directory=args.dir))
        for a in done:
            print(f"archived {a.table} {a.month:%Y-%m}: {a.rows} rows → {a.file} (sha256 {a.sha256})")
        if not done:
            print("nothing to archive")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
