"""Monitoring assets in deploy/: the Grafana dashboard, the Prometheus alert rules and config.

Every PromQL expression must name only metrics (and labels, and label values) that a real
gateway exports after real traffic, so a renamed metric breaks a test instead of silently
emptying a panel or disarming an alert. promtool checks the rule and config syntax, the
dashboard's queries, and runs each alert expression against synthetic series.

PyYAML is not a dependency: alerts.yml keeps every `expr:` on one line and is read line by
line here; promtool (which parses the real YAML) confirms the reader saw every rule.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import Gw

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "tokensforge-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCE = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "tokensforge.yml"

MESSAGES = [{"role": "user", "content": "hi"}]
DATASOURCE_REF = "${datasource}"
# Prometheus adds these to every scraped series; `up` is synthesised by Prometheus itself.
TARGET_LABELS = frozenset({"job", "instance"})
SYNTHESISED = {"up": frozenset(TARGET_LABELS)}


# ---------------------------------------------------------------- a small PromQL reader

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+)
  | (?P<num>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@])
""", re.VERBOSE)

_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATORS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
_KEYWORDS = {"and", "or", "unless", "atan2", "bool", "offset", "inf", "nan"}


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # labels in by/without/on/ignoring/group_x

    @property
    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors}


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read PromQL at {expr[pos:]!r} in {expr!r}")
        pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, m.group()))
    return out


def _unquote(literal: str) -> str:
    if literal[0] == "`":
        return literal[1:-1]
    return re.sub(r"\\(.)", r"\1", literal[1:-1])


def _matchers(toks: list[tuple[str, str]], i: int) -> tuple[list[tuple[str, str, str]], int]:
    """Read `{label op "value", ...}` starting at toks[i] == '{'; return (matchers, index after '}')."""
    found, i = [], i + 1
    while toks[i][1] != "}":
        if toks[i][1] == ",":
            i += 1
            continue
        (lk, label), (_, op), (vk, value) = toks[i], toks[i + 1], toks[i + 2]
        if lk != "ident" or op not in ("=", "!=", "=~", "!~") or vk not in ("str", "var"):
            raise ValueError(f"unexpected label matcher {label} {op} {value}")
        found.append((label, op, _unquote(value) if vk == "str" else value))
        i += 3
    return found, i + 1


def read_promql(expr: str) -> Query:
    """The metric selectors and grouping labels of a PromQL expression.

    An identifier is a metric unless it is a keyword, names a function (followed by `(`),
    an aggregation, or sits in a label matcher, a grouping list or a range `[...]`.
    """
    toks, query, i = _tokens(expr), Query(), 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "ident" and text in _GROUPING:
            i += 1
            if following == "(":
                i += 1
                while toks[i][1] != ")":
                    if toks[i][0] == "ident":
                        query.grouping.add(toks[i][1])
                    i += 1
                i += 1
        elif kind == "ident" and (following == "(" or text in _AGGREGATORS or text.lower() in _KEYWORDS):
            i += 1
        elif kind == "ident":
            matchers: list[tuple[str, str, str]] = []
            i += 1
            if following == "{":
                matchers, i = _matchers(toks, i)
            query.selectors.append(Selector(text, tuple(matchers)))
        elif text == "{":  # a selector without a name: {__name__="metric", ...}
            matchers, i = _matchers(toks, i)
            names = [v for label, op, v in matchers if label == "__name__" and op == "="]
            if not names:
                raise ValueError(f"selector without a metric name in {expr!r}")
            query.selectors.append(Selector(names[0], tuple(m for m in matchers if m[0] != "__name__")))
        elif text == "[":  # range or subquery: durations and grafana interval variables
            while toks[i][1] != "]":
                i += 1
            i += 1
        else:
            i += 1
    return query


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.*\S)\s*,\s*)?(?P<label>[a-zA-Z_]\w*)\s*\)\s*$")


def read_variable_query(text: str) -> Query:
    """A Grafana Prometheus variable query: `label_values(selector, label)` or `query_result(expr)`."""
    m = _LABEL_VALUES.match(text)
    if m:
        query = read_promql(m["selector"]) if m["selector"] else Query()
        query.grouping.add(m["label"])  # the label must exist on the selected metric
        return query
    m = re.match(r"^\s*query_result\((.*)\)\s*$", text)
    return read_promql(m[1] if m else text)


def test_promql_reader_finds_metrics_not_functions_labels_or_keywords() -> None:
    q = read_promql('histogram_quantile(0.99, sum by (le, op) (rate(tokensforge_ledger_op_duration_seconds_bucket'
                    '{op!="x", instance=~"$instance"}[$__rate_interval] offset 5m))) > bool 0.05')
    assert q.metrics == {"tokensforge_ledger_op_duration_seconds_bucket"}
    assert q.grouping == {"le", "op"}
    assert q.selectors[0].matchers == (("op", "!=", "x"), ("instance", "=~", "$instance"))
    q = read_promql('sum(rate(a_total{status="fai\\"led"}[5m:1m])) by (route_kind) / on(job) group_left(x) '
                    'sum without (le) (b) * 1e9 and max_over_time(c[1h]) unless {__name__="d", job="j"} or Inf')
    assert q.metrics == {"a_total", "b", "c", "d"}
    assert q.grouping == {"route_kind", "job", "x", "le"}
    assert q.selectors[0].matchers == (("status", "=", 'fai"led'),)
    assert read_promql('up{job="tokensforge"} == 0').metrics == {"up"}
    assert read_promql("sum(x) by (a) * count without () (y:z)").metrics == {"x", "y:z"}
    q = read_variable_query("label_values(tokensforge_requests_total{bucket=\"credit\"}, route_kind)")
    assert q.metrics == {"tokensforge_requests_total"} and q.grouping == {"route_kind"}
    assert read_variable_query("label_values(channel)").metrics == set()


# ---------------------------------------------------------------- reading the assets


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, Query]]:
    """(where, expression, parsed) for every panel target and every query variable."""
    found = []
    for panel in panels_of(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel['title']!r} target {target.get('refId')}"
            found.append((where, target["expr"], read_promql(target["expr"])))
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        texts = {var["query"]["query"] if isinstance(var["query"], dict) else var["query"], var.get("definition", "")}
        for text in filter(None, texts):
            found.append((f"variable {var['name']!r}", text, read_variable_query(text)))
    return found


def _yaml_scalar(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith('"'):
        return str(json.loads(raw))  # the double-quoted scalars used here are valid JSON strings
    if raw.startswith("'"):
        return raw[1:-1].replace("''", "'")
    return re.sub(r"\s+#.*$", "", raw)


_RULE_START = re.compile(r"^\s*-\s*(alert|record):\s*(\S+)\s*$")
_GROUP = re.compile(r"^\s*-\s*name:\s*(\S+)\s*$")
_FIELD = re.compile(r"^\s*(expr|for|severity|summary|description):\s*(.*)$")


def read_rules(text: str) -> list[dict[str, str]]:
    """Rules of alerts.yml as flat dicts (group, alert, expr, for, severity, summary, description)."""
    rules: list[dict[str, str]] = []
    group = ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        if m := _GROUP.match(line):
            group = m[1]
        elif m := _RULE_START.match(line):
            rules.append({"group": group, m[1]: _yaml_scalar(m[2])})
        elif (m := _FIELD.match(line)) and rules:
            value = m[2].strip()
            assert value and value[0] not in "|>", (
                f"alerts.yml:{number}: keep `{m[1]}:` on one line (this test reads the file line by line)")
            rules[-1][m[1]] = _yaml_scalar(value)
    return rules


def promtool() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if path is None:
        pytest.fail("promtool not found: run `make promtool` (deploy/ensure-promtool.sh installs "
                    "Debian's prometheus package) — it checks deploy/prometheus/*.yml")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, check=False)


# ---------------------------------------------------------------- what a real gateway exports


@dataclass
class Exported:
    labels: dict[str, set[str]]  # sample name -> label names
    values: dict[tuple[str, str], set[str]]  # (sample name, label) -> values seen


async def exported_after_traffic(gw: Gw) -> Exported:
    """Drive a success, a channel fallback and a failure through a real gateway, then read /metrics."""
    _, key = await gw.account(credit=10**9, routed=10**9)
    client = gw.client(key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
    # the "dead" channel refuses connections: relay-b serves, a channel fallback is counted
    await client.chat.completions.create(model="flaky-chain", messages=MESSAGES, max_tokens=2,
                                         extra_body={"route": "routed"})
    # an upstream that serves more than the reservation covers: the gap is counted as undercharged
    await gw.mock.faults(**{"up-official": {"completion_tokens": 50}})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
    await gw.mock.faults(**{"up-official": {"error_status": 500}})
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
    async with gw.session.get(gw.url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    labels: dict[str, set[str]] = defaultdict(set)
    values: dict[tuple[str, str], set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels[sample.name].update(sample.labels)
            for label, value in sample.labels.items():
                values[sample.name, label].add(value)
    for name, names in SYNTHESISED.items():
        labels[name] = set(names)
    return Exported(dict(labels), dict(values))


def unknown_references(where: str, expr: str, query: Query, exported: Exported) -> list[str]:
    """What `expr` names that the gateway does not export: metrics, labels, equality-matched values."""
    problems = []
    known_labels: set[str] = set(TARGET_LABELS)
    for metric in sorted(query.metrics):
        if metric in exported.labels:
            known_labels |= exported.labels[metric]
        else:
            problems.append(f"{where}: metric {metric} is not exported by the gateway  [{expr}]")
    for sel in query.selectors:
        for label, op, value in sel.matchers:
            if sel.metric not in exported.labels or label in TARGET_LABELS:
                continue
            if label not in exported.labels[sel.metric]:
                problems.append(f"{where}: {sel.metric} has no label {label!r}  [{expr}]")
            elif op == "=" and "$" not in value and value not in exported.values.get((sel.metric, label), set()):
                seen = sorted(exported.values.get((sel.metric, label), set()))
                problems.append(f"{where}: {sel.metric}{{{label}={value!r}}} never seen (seen: {seen}); "
                                f"fix the value or drive it in exported_after_traffic()  [{expr}]")
    for label in sorted(query.grouping - known_labels):
        problems.append(f"{where}: no metric of the expression has label {label!r}  [{expr}]")
    if not query.metrics:
        problems.append(f"{where}: no metric found in the expression  [{expr}]")
    return problems


async def test_every_dashboard_query_uses_exported_metrics(gw: Gw) -> None:
    exported = await exported_after_traffic(gw)
    queries = dashboard_queries(load_dashboard())
    assert len(queries) >= 15
    problems = [p for where, expr, q in queries for p in unknown_references(where, expr, q, exported)]
    assert not problems, "\n".join(problems)


async def test_every_alert_expression_uses_exported_metrics(gw: Gw) -> None:
    exported = await exported_after_traffic(gw)
    rules = read_rules(ALERTS.read_text(encoding="utf-8"))
    assert rules
    problems = [p for rule in rules
                for p in unknown_references(f"alert {rule.get('alert')}", rule["expr"], read_promql(rule["expr"]),
                                            exported)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- promtool


def test_promtool_accepts_the_alert_rules_and_the_reader_sees_them_all() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found, result.stdout
    rules = read_rules(ALERTS.read_text(encoding="utf-8"))
    assert len(rules) == int(found[1]), "the line reader and promtool disagree on the number of rules"
    assert all("expr" in rule for rule in rules), rules


def test_promtool_accepts_the_prometheus_config() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, result.stdout
    text = PROMETHEUS.read_text(encoding="utf-8")
    assert re.search(r"job_name:\s*tokensforge\b", text)
    assert "gateway-1:8080" in text and "gateway-2:8080" in text
    assert re.search(r"rule_files:\s*\n\s*-\s*alerts\.yml", text)


def _as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, as Grafana would send it."""
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(var, value)
    return re.sub(r"\$\{\w+\}|\$\w+", ".*", expr)  # multi-value variables only appear in =~ matchers


def test_promtool_accepts_every_dashboard_query(tmp_path: Path) -> None:
    exprs = [expr for _, expr, _ in dashboard_queries(load_dashboard()) if not expr.lstrip().startswith("label_values")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": _as_promql(expr)} for n, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules, indent=1), encoding="utf-8")  # JSON is YAML
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"job": "tokensforge", "instance": "gateway-1:8080", **labels}
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{inner}}}", "values": values}


GW2 = "gateway-2:8080"
REQ = "tokensforge_requests_total"
LEDGER = "tokensforge_ledger_op_duration_seconds_bucket"
OK = {"model": "gpt-4o-mini", "route_kind": "official", "bucket": "credit", "status": "succeeded"}
FAILED = {**OK, "status": "failed"}


def _ledger(op: str, per_minute: dict[str, int]) -> list[dict[str, str]]:
    return [_series(LEDGER, f"0+{n}x20", op=op, le=le) for le, n in per_minute.items()]


# alert -> (eval time, series where it fires, labels it fires with, series where it stays quiet)
SCENARIOS: dict[str, tuple[str, list[dict[str, str]], list[str], list[dict[str, str]]]] = {
    "GatewayDown": (
        "5m", [_series("up", "1 1 0 0 0 0"), _series("up", "1x5", instance=GW2)],
        ['{instance="gateway-1:8080", job="tokensforge"}'],
        [_series("up", "1x5"), _series("up", "1x5", instance=GW2)]),
    "DatabaseUnavailable": (
        "5m", [_series("tokensforge_database_up", "0x5"), _series("tokensforge_database_up", "1x5", instance=GW2)],
        ['{instance="gateway-1:8080"}'],
        [_series("tokensforge_database_up", "1x5"), _series("tokensforge_database_up", "1x5", instance=GW2)]),
    "ChannelDown": (  # down on every gateway fires; down on one of two does not
        "5m", [_series("tokensforge_channel_up", "0x5", channel="relay-a"),
               _series("tokensforge_channel_up", "0x5", channel="relay-a", instance=GW2),
               _series("tokensforge_channel_up", "1x5", channel="relay-b")],
        ['{channel="relay-a"}'],
        [_series("tokensforge_channel_up", "0x5", channel="relay-a"),
         _series("tokensforge_channel_up", "1x5", channel="relay-a", instance=GW2)]),
    "ChannelCircuitOpen": (
        "5m", [_series("tokensforge_circuit_state", "2x5", channel="relay-a"),
               _series("tokensforge_circuit_state", "0x5", channel="relay-a", instance=GW2),
               _series("tokensforge_circuit_state", "0x5", channel="relay-b")],
        ['{channel="relay-a"}'],
        [_series("tokensforge_circuit_state", "0x5", channel="relay-a"),
         _series("tokensforge_circuit_state", "0x5", channel="relay-b")]),
    "HighErrorRate": (  # 10% failing for over an hour fires; a 9-minute spike alone does not (1h window)
        "69m", [_series(REQ, "0+90x69", **OK), _series(REQ, "0+10x69", **FAILED)],
        ["{}"],
        [_series(REQ, "0+99x69", **OK), _series(REQ, "0x60 10+10x8", **FAILED)]),
    "FallbackSurge": (
        "20m", [_series(REQ, "0+100x20", **OK), _series("tokensforge_fallbacks_total", "0+20x20", kind="channel")],
        ["{}"],
        [_series(REQ, "0+100x20", **OK), _series("tokensforge_fallbacks_total", "0+2x20", kind="channel")]),
    "UpstreamOverservesReservations": (  # any undercharge over 10 minutes, on every gateway summed
        "15m", [_series("tokensforge_undercharged_nanos_total", "0+5000x15", route_kind="routed")],
        ['{route_kind="routed"}'],
        [_series("tokensforge_undercharged_nanos_total", "0x15", route_kind="routed")]),
    "LedgerLatencyHigh": (  # p99 of "finish" lands between 50 and 100 ms; "reserve" stays fast
        "20m", _ledger("finish", {"0.005": 50, "0.05": 90, "0.1": 100, "+Inf": 100})
        + _ledger("reserve", {"0.005": 100, "0.05": 100, "0.1": 100, "+Inf": 100}),
        ['{op="finish"}'],
        _ledger("reserve", {"0.005": 100, "0.05": 100, "0.1": 100, "+Inf": 100})),
}


def test_every_alert_fires_on_its_scenario_and_stays_quiet_otherwise(tmp_path: Path) -> None:
    rules = read_rules(ALERTS.read_text(encoding="utf-8"))
    missing = [r["alert"] for r in rules if r.get("alert") and r["alert"] not in SCENARIOS]
    assert not missing, f"add a scenario to SCENARIOS for {missing}"
    tests = []
    for rule in rules:
        eval_time, firing, fires_with, quiet = SCENARIOS[rule["alert"]]
        # count without (): one sample per alert instance, valued 1, with the alert's labels
        expr = f"count without () ({rule['expr']})"
        tests.append({"interval": "1m", "input_series": firing, "promql_expr_test": [
            {"expr": expr, "eval_time": eval_time, "exp_samples": [{"labels": ls, "value": 1} for ls in fires_with]}]})
        tests.append({"interval": "1m", "input_series": quiet, "promql_expr_test": [
            {"expr": expr, "eval_time": eval_time, "exp_samples": []}]})
    path = tmp_path / "alerts-test.yml"
    path.write_text(json.dumps({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests}, indent=1),
                    encoding="utf-8")
    result = run_promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- structure

REQUIRED_ALERTS = {"GatewayDown", "DatabaseUnavailable", "ChannelDown", "ChannelCircuitOpen", "HighErrorRate",
                   "FallbackSurge", "LedgerLatencyHigh"}


def test_every_alert_has_for_severity_summary_and_description() -> None:
    rules = read_rules(ALERTS.read_text(encoding="utf-8"))
    assert {r.get("alert") for r in rules} >= REQUIRED_ALERTS
    for rule in rules:
        assert rule["group"] == "tokensforge", rule
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{rule.get('alert')}: needs `for`"
        assert rule.get("severity") in ("critical", "warning", "info"), f"{rule.get('alert')}: needs a severity"
        assert rule.get("summary") and rule.get("description"), f"{rule.get('alert')}: needs summary and description"
    by_name = {r["alert"]: r for r in rules}
    assert by_name["ChannelDown"]["for"] == "2m"
    assert "[5m]" in by_name["HighErrorRate"]["expr"] and "[1h]" in by_name["HighErrorRate"]["expr"]
    assert "tokensforge_database_up" in by_name["DatabaseUnavailable"]["expr"]


REQUIRED_PANELS = [  # (title fragment, metric its queries must use)
    ("Traffic by route kind", "tokensforge_requests_total"),
    ("Errors by route kind", "tokensforge_requests_total"),
    ("Spend per bucket and route kind", "tokensforge_spend_nanos_total"),
    ("Tokens by direction", "tokensforge_tokens_total"),
    ("Request latency p50/p95/p99", "tokensforge_request_duration_seconds_bucket"),
    ("Upstream latency p95 by channel", "tokensforge_upstream_latency_seconds_bucket"),
    ("Upstream attempts by outcome", "tokensforge_upstream_attempts_total"),
    ("Fallbacks", "tokensforge_fallbacks_total"),
    ("Channel health", "tokensforge_channel_up"),
    ("Circuit state", "tokensforge_circuit_state"),
    ("Reservations in flight", "tokensforge_reservations_inflight"),
    ("Ledger op latency p95/p99", "tokensforge_ledger_op_duration_seconds_bucket"),
    ("Process CPU", "process_cpu_seconds_total"),
    ("Process RSS", "process_resident_memory_bytes"),
]


def test_dashboard_has_the_panels_and_every_query_uses_the_datasource_variable() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"]
    panels = panels_of(dashboard)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for fragment, metric in REQUIRED_PANELS:
        matching = [p for p in panels if fragment in p["title"]]
        assert matching, f"no panel titled like {fragment!r}"
        used = {m for p in matching for t in p["targets"] for m in read_promql(t["expr"]).metrics}
        assert metric in used, f"panel {fragment!r} should query {metric}"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] == "row":
            continue  # rows hold no queries
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_REF}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_REF, (panel["title"], target)
            assert "sum by" in target["expr"] or "min by" in target["expr"] or "max by" in target["expr"] \
                or target["expr"].startswith("sum("), f"aggregate over instances and workers: {target['expr']}"
    circuit = next(p for p in panels if "Circuit state" in p["title"])
    texts = {o["text"] for m in circuit["fieldConfig"]["defaults"]["mappings"] for o in m["options"].values()}
    assert texts == {"closed", "half_open", "open"}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("route_kind", "channel"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"]["uid"] == DATASOURCE_REF
        assert variables[name]["definition"].startswith("label_values(")
        assert any(f'{name}=~"${name}"' in t["expr"] for p in panels for t in p.get("targets", [])), name


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards_dir() -> None:
    datasource = GRAFANA_DATASOURCE.read_text(encoding="utf-8")
    assert re.search(r"^apiVersion: 1$", datasource, re.MULTILINE)
    assert re.search(r"^\s+type: prometheus$", datasource, re.MULTILINE)
    assert re.search(r"^\s+url: http://prometheus:9090$", datasource, re.MULTILINE)
    dashboards = GRAFANA_DASHBOARDS.read_text(encoding="utf-8")
    assert re.search(r"^apiVersion: 1$", dashboards, re.MULTILINE)
    assert re.search(r"^\s+type: file$", dashboards, re.MULTILINE)
    assert re.search(r"^\s+path: /var/lib/grafana/dashboards$", dashboards, re.MULTILINE)
    for text in (datasource, dashboards):
        assert "\t" not in text, "YAML forbids tabs for indentation"
