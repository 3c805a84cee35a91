"""`tokensforge research`: the research assistant from a terminal, against a running gateway."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import aiohttp
import orjson

from .money import usd, usd_to_nanos


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic")
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-charge", required=True, help="the most the report may cost, in USD (e.g. 0.05)")
    parser.add_argument("--yes", action="store_true", help="do not ask before running")
    parser.add_argument("--route", help="pin a route id or kind")
    parser.add_argument("--section", action="append", dest="sections", help="a section title (repeatable)")
    parser.add_argument("--base-url", default=os.environ.get("TOKENSFORGE_BASE_URL", "http://127.0.0.1:8080/v1"))
    parser.add_argument("--api-key", default=os.environ.get("TOKENSFORGE_API_KEY"),
                        help="or TOKENSFORGE_API_KEY")


async def run(args: argparse.Namespace, out: Any = sys.stdout, answer: Any = input) -> int:
    if not args.api_key:
        print("tokensforge research: set TOKENSFORGE_API_KEY or pass --api-key", file=sys.stderr)
        return 2
    try:
        cap = usd_to_nanos(args.max_charge)
    except ValueError as exc:
        print(f"tokensforge research: --max-charge: {exc}", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"topic": args.topic, "model": args.model, "max_charge_nanos": cap}
    if args.route:
        body["route"] = args.route
    if args.sections:
        body["sections"] = args.sections
    headers = {"authorization": f"Bearer {args.api_key}", "content-type": "application/json"}
    url = args.base_url.rstrip("/") + "/research/reports"
    async with aiohttp.ClientSession(headers=headers) as session:
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
    print(_report_text(report), file=out)
    return 0 if report["status"] == "completed" else 1


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
                if name == "section_started":
                    print(f"  writing {data['index'] + 1}: {data['title']} …", file=out, flush=True)
                elif name == "section_completed":
                    print(f"  done    {data['index'] + 1}: {data['title']}  "
                          f"${data['receipt']['charge_usd']}", file=out, flush=True)
                elif name == "report_completed":
                    return dict(data)
    return None


def _estimate_text(e: dict[str, Any]) -> str:
    return (f"Route {e['route']['id']} ({e['route']['kind']}), bucket {e['bucket']}\n"
            f"Sections: {', '.join(e['sections'])}\n"
            f"Estimate: up to ${usd(e['expected_nanos'])} (cap ${usd(e['max_charge_nanos'])}); "
            f"holds ${usd(e['reserve_nanos'])} at a time; available ${usd(e['available_nanos'])}")


def _report_text(report: dict[str, Any]) -> str:
    lines = [f"\n# {report['topic']}\n"]
    for section in report["sections"]:
        lines += [f"## {section['title']}", section.get("content") or f"(failed: {section['error']['message']})", ""]
    lines += [report["disclaimer"], "", f"{'section':32} {'request':30} {'tokens':>7} {'charge USD':>13} ledger"]
    for section in report["sections"]:
        r = section.get("receipt")
        if r:
            lines.append(f"{section['title'][:32]:32} {r['request_id']:30} {r['usage']['total_tokens']:>7} "
                         f"{r['charge_usd']:>13} {r['ledger_entry_id']}")
    lines.append(f"{'total':32} {'':30} {'':>7} {usd(report['total_charge_nanos']):>13}  status: {report['status']}")
    lines.append(f"balance {report['bucket']}: ${usd(report['balance_before_nanos'])} → "
                 f"${usd(report['balance_after_nanos'])}")
    return "\n".join(lines)
