"""`tokensforge research`: the research assistant from a terminal, against a running gateway.

`tokensforge research "TOPIC" --model M --max-charge USD [--yes]` writes a report;
`--list` shows the account's kept reports and `--show ID` prints one again."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from .money import usd, usd_to_nanos
from .research import DISCLAIMER, report_markdown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", nargs="?", help="what the report is about (to write a new report)")
    parser.add_argument("--model", help="the model that writes the report")
    parser.add_argument("--max-charge", help="the most the report may cost, in USD (e.g. 0.05)")
    parser.add_argument("--yes", action="store_true", help="do not ask before running")
    parser.add_argument("--route", help="pin a route id or kind")
    parser.add_argument("--section", action="append", dest="sections", help="a section title (repeatable)")
    notes = parser.add_mutually_exclusive_group()
    notes.add_argument("--context", help="your own notes, given to every section")
    notes.add_argument("--context-file", type=Path, help="your own notes, read from a file")
    kept = parser.add_mutually_exclusive_group()
    kept.add_argument("--list", action="store_true", help="list this account's reports, newest first")
    kept.add_argument("--show", metavar="ID", help="print a kept report again, with its receipts")
    parser.add_argument("--limit", type=int, default=20, help="how many reports --list shows (1-100)")
    parser.add_argument("--base-url", default=os.environ.get("TOKENSFORGE_BASE_URL", "http://127.0.0.1:8080/v1"))
    parser.add_argument("--api-key", default=os.environ.get("TOKENSFORGE_API_KEY"),
                        help="or TOKENSFORGE_API_KEY")


async def run(args: argparse.Namespace, out: Any = sys.stdout, answer: Any = input) -> int:
    if not args.api_key:
        print("tokensforge research: set TOKENSFORGE_API_KEY or pass --api-key", file=sys.stderr)
        return 2
    headers = {"authorization": f"Bearer {args.api_key}", "content-type": "application/json"}
    url = args.base_url.rstrip("/") + "/research/reports"
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            if args.list:
                return await _list(session, url, args.limit, out)
            if args.show:
                return await _show(session, url, args.show, out)
            return await _write(session, url, args, out, answer)
    except aiohttp.ClientError as exc:
        print(f"tokensforge research: cannot reach the gateway at {args.base_url}: {exc}", file=sys.stderr)
        return 1


def _request_body(args: argparse.Namespace) -> dict[str, Any] | str:
    """The POST body, or what is wrong with the arguments."""
    if not args.topic or not args.model or not args.max_charge:
        return "to write a report give TOPIC, --model and --max-charge (or use --list / --show ID)"
    try:
        cap = usd_to_nanos(args.max_charge)
    except ValueError as exc:
        return f"--max-charge: {exc}"
    body: dict[str, Any] = {"topic": args.topic, "model": args.model, "max_charge_nanos": cap}
    if args.route:
        body["route"] = args.route
    if args.sections:
        body["sections"] = args.sections
    if args.context_file is not None:
        try:
            body["context"] = args.context_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return f"--context-file: {exc}"
    elif args.context:
        body["context"] = args.context
    return body


async def _write(session: aiohttp.ClientSession, url: str, args: argparse.Namespace, out: Any,
                 answer: Any) -> int:
    body = _request_body(args)
    if isinstance(body, str):
        print(f"tokensforge research: {body}", file=sys.stderr)
        return 2
    async with session.post(url, data=orjson.dumps({**body, "dry_run": True})) as r:
        data = await r.json()
        if r.status != 200:
            print(f"refused: {data['error']['message']}", file=out)
            return 1
    estimate = data["estimate"]
    print(_estimate_text(estimate), file=out)
    if not estimate["allowed"]:
        print(f"refused: {estimate['reason']}", file=out)
        return 1
    if not args.yes and answer("Run it? [y/N] ").strip().lower() not in ("y", "yes"):
        print("not run; nothing was charged", file=out)
        return 1
    report = await _stream(session, url, {**body, "stream": True}, out)
    if report is None:
        return 1
    print("\n" + report_markdown(report), file=out)
    return 0 if report["status"] == "completed" else 1


async def _list(session: aiohttp.ClientSession, url: str, limit: int, out: Any) -> int:
    async with session.get(url, params={"limit": str(limit)}) as r:
        data = await r.json()
        if r.status != 200:
            print(f"tokensforge research: {data['error']['message']}", file=sys.stderr)
            return 1
    if not data["data"]:
        print("no reports yet", file=out)
    else:
        print(f"{'id':22} {'created (UTC)':16}  {'status':14} {'total USD':>12}  topic", file=out)
        for item in data["data"]:
            print(f"{item['id']:22} {_when(item['created_at']):16}  {item['status']:14} "
                  f"{item['total_charge_usd']:>12}  {item['topic']}", file=out)
        if data["has_more"]:
            print(f"(the newest {len(data['data'])} shown; --limit shows more)", file=out)
    print(DISCLAIMER, file=out)
    return 0


async def _show(session: aiohttp.ClientSession, url: str, report_id: str, out: Any) -> int:
    async with session.get(f"{url}/{quote(report_id, safe='')}") as r:
        data = await r.json()
        if r.status != 200:
            print(f"tokensforge research: {data['error']['message']}", file=sys.stderr)
            return 1
    print(report_markdown(data), file=out)
    return 0


def _when(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M")


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], out: Any) -> dict[str, Any] | None:
    async with session.post(url, data=orjson.dumps(body)) as r:
        if r.status != 200:
            print(f"refused: {(await r.json())['error']['message']}", file=out)
            return None
        name = ""
        async for line in r.content:
            if line.startswith(b"event: "):
                name = line[7:].strip().decode()
            elif line.startswith(b"data: "):
                data = orjson.loads(line[6:])
                if name == "estimate":
                    print(f"report {data['report_id']} (kept: tokensforge research --show {data['report_id']})",
                          file=out, flush=True)
                elif name == "section_started":
                    print(f"  writing {data['index'] + 1}: {data['title']} …", file=out, flush=True)
                elif name == "section_completed":
                    print(f"  done    {data['index'] + 1}: {data['title']}  "
                          f"${data['receipt']['charge_usd']}", file=out, flush=True)
                elif name == "section_failed":
                    print(f"  failed  {data['index'] + 1}: {data['title']}: {data['error']['message']}",
                          file=out, flush=True)
                elif name == "report_completed":
                    return dict(data)
    return None


def _estimate_text(e: dict[str, Any]) -> str:
    return (f"Route {e['route']['id']} ({e['route']['kind']}), bucket {e['bucket']}\n"
            f"Sections: {', '.join(e['sections'])}\n"
            f"Estimate: up to ${usd(e['expected_nanos'])} (cap ${usd(e['max_charge_nanos'])}); "
            f"holds ${usd(e['reserve_nanos'])} at a time; available ${usd(e['available_nanos'])}")
