"""The deployment files in deploy/ (Dockerfile, docker-compose.yml, k8s/, catalog.example.toml).

These are the fast text checks (`make test`); the image itself is built and run, two gateway containers
as the compose file runs them, by tests/test_image.py (`make image-test`). No cluster runs here: the
Kubernetes manifests are validated against the Kubernetes API schemas (kubernetes-validate, a test
dependency) and checked below for what they must say. The files are checked against the code they
deploy: every command line is parsed by the real `tokensforge.cli.build_parser()` and resolved with the
real `Settings.from_env` (a renamed flag or environment variable breaks a test), the example catalog is
loaded with the real `load_catalog`, and every port, path, probe, mount and secret reference is checked
against the place it has to match.

The YAML here is written in plain block style (flow lists as JSON) and most checks read it with the small
indentation splitter below, so a file that drifts from that style fails loudly; the schema checks at the
end read it with PyYAML (which kubernetes-validate brings).
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from tokensforge.catalog import Catalog, load_catalog
from tokensforge.cli import build_parser
from tokensforge.settings import _TUNABLE, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CATALOG = DEPLOY / "catalog.example.toml"
CONFIG_PATH = PurePosixPath("/etc/tokensforge/catalog.toml")
CONTAINER_PORT = 8080
GATEWAYS = {"gateway-1": 8081, "gateway-2": 8082}

# Every TOKENSFORGE_* variable the code reads (SPEC §4 plus the tunables in settings.py).
KNOWN_TOKENSFORGE_ENV = {"TOKENSFORGE_DATABASE_URL", "TOKENSFORGE_DIRECT_DATABASE_URL", "TOKENSFORGE_ADMIN_TOKEN",
                         "TOKENSFORGE_CONFIG"} | {
    f"TOKENSFORGE_{name.upper()}" for name in _TUNABLE
}


# ----------------------------------------------------------------------------- tiny readers


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def mapping(text: str) -> dict[str, str]:
    """Split a block-style YAML mapping into {key: inline value + the lines nested under it}.

    Keys are the lines at the block's smallest indentation; comment lines at that level are skipped;
    nested lines are kept verbatim (so block scalars survive).
    """
    lines = text.splitlines()
    content = [line for line in lines if line.strip() and not _is_comment(line)]
    assert content, "empty YAML block"
    base = min(_indent(line) for line in content)
    result: dict[str, list[str]] = {}
    current: str | None = None
    for line in lines:
        if line.strip() and _indent(line) <= base:
            if _is_comment(line):
                continue
            if line.strip() == "---":
                raise AssertionError("one document per file, please")
            match = re.fullmatch(r" *([\w.\-/]+):(?: (.*))?", line)
            assert match and _indent(line) == base, f"not a block-style mapping key: {line!r}"
            current = match.group(1)
            assert current not in result, f"duplicate key {current!r}"
            result[current] = [match.group(2) or ""]
        elif current is not None:
            result[current].append(line)
    return {key: "\n".join(value) for key, value in result.items()}


def items(text: str) -> list[str]:
    """Split a block-style YAML sequence into its items (each as a mapping-shaped text block)."""
    lines = [line for line in text.splitlines() if line.strip() and not _is_comment(line)]
    base = min(_indent(line) for line in lines)
    result: list[list[str]] = []
    for line in lines:
        if _indent(line) == base:
            assert line.lstrip().startswith("- "), f"not a block-style sequence item: {line!r}"
            result.append([" " * (base + 2) + line.lstrip()[2:]])
        else:
            result[-1].append(line)
    return ["\n".join(item) for item in result]


def scalar(value: str) -> str:
    value = value.strip()
    if value.startswith('"'):
        return str(json.loads(value))
    if value.startswith("'"):
        assert value.endswith("'"), value
        return value[1:-1]
    return value


def flow_list(value: str) -> list[str]:
    """A flow sequence written as JSON, e.g. `args: ["serve", "--port", "8080"]`."""
    try:
        parsed = json.loads(value.strip())
    except json.JSONDecodeError:
        raise AssertionError(f"write this list as a JSON-style flow sequence: {value.strip()!r}") from None
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), value
    return parsed


def path(doc: str, *keys: str) -> str:
    for key in keys:
        blocks = mapping(doc)
        assert key in blocks, f"missing key {key!r} (have {sorted(blocks)})"
        doc = blocks[key]
    return doc


def read(path_: Path) -> str:
    assert path_.is_file(), f"{path_.relative_to(ROOT)} is missing"
    return path_.read_text(encoding="utf-8")


def parse(argv: list[str]) -> argparse.Namespace:
    """`tokensforge <argv>` through the real parser, with flags spelled out (no argparse prefix matching,
    so a file that only works because `--worker` abbreviates `--workers` fails too)."""
    parser = build_parser()
    parser.allow_abbrev = False
    for action in parser._actions:  # argparse has no public handle on its subparsers
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.allow_abbrev = False
    try:
        return parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"`tokensforge {' '.join(argv)}` is not a valid command line") from None


def serve_settings(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    """What `tokensforge <argv>` would run with: the real parser, the real Settings.from_env."""
    args = parse(argv)
    assert args.command == "serve", argv
    return Settings.from_env(env or {}, config_path=args.config, host=args.host, port=args.port,
                             data_dir=args.data_dir, workers=args.workers)


def catalog_key_envs() -> set[str]:
    catalog = load_catalog(CATALOG)
    envs = {channel.api_key_env for channel in catalog.channels.values()}
    assert None not in envs, "every production channel needs an api_key_env"
    return {env for env in envs if env is not None}


def healthcheck_url(command: list[str]) -> str:
    """The URL a `python -c "…urlopen('URL'…)"` healthcheck opens (or its default where the URL may come from
    TOKENSFORGE_HEALTHCHECK_URL: host networking, several containers on one host); the code must compile."""
    assert command[-3:-1] == ["python", "-c"], command
    code = command[-1]
    compile(code, "healthcheck", "exec")
    assert "urllib.request.urlopen(" in code, code
    match = re.search(r"urlopen\((?:os\.environ\.get\('TOKENSFORGE_HEALTHCHECK_URL', )?'([^']+)'", code)
    assert match, code
    return match.group(1)


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in read(DEPLOY / "Dockerfile").splitlines():
        if _is_comment(line) or (not pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        keyword, _, rest = logical.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return instructions


def docker_one(keyword: str) -> str:
    found = [rest for kw, rest in dockerfile() if kw == keyword]
    assert found, f"no {keyword} in deploy/Dockerfile"
    return found[-1]  # the last one is the one that counts


def test_dockerfile_base_user_install_and_copied_sources() -> None:
    instructions = dockerfile()
    # both stages build on one base, a build argument whose default is the registry's python:3.11-slim
    # (`make image` passes a Debian-built one where no registry can be reached: deploy/build-image.sh)
    bases = [rest.split()[0] for kw, rest in instructions if kw == "FROM"]
    assert len(bases) == 2 and all(base == "${BASE_IMAGE}" for base in bases), bases
    args = [rest for kw, rest in instructions if kw == "ARG"]
    assert "BASE_IMAGE=python:3.11-slim" in args, args
    assert instructions.index(("ARG", "BASE_IMAGE=python:3.11-slim")) < [kw for kw, _ in instructions].index("FROM")

    user = docker_one("USER").split(":")[0]
    assert user not in {"root", "0"}, "the image must not run as root"

    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "the package is installed with `pip install .`"

    pyproject = tomllib.loads(read(ROOT / "pyproject.toml"))
    copied: set[str] = set()
    for kw, rest in instructions:
        if kw == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the build context (repo root)"
                copied.add(source.rstrip("/"))
    # what `pip install .` needs: the project file, its readme, the package (with its package data)
    assert {"pyproject.toml", pyproject["project"]["readme"], "tokensforge"} <= copied, copied

    assert json.loads(docker_one("ENTRYPOINT")) == ["tokensforge"]
    assert "tokensforge" in pyproject["project"]["scripts"]


def test_dockerfile_cmd_is_a_real_serve_command_on_the_exposed_port() -> None:
    cmd = json.loads(docker_one("CMD"))
    settings = serve_settings(cmd)
    assert settings.config_path == Path(CONFIG_PATH)
    assert settings.host == "0.0.0.0"
    assert settings.workers == 2
    exposed = [int(port.split("/")[0]) for port in docker_one("EXPOSE").split()]
    assert exposed == [settings.port] == [CONTAINER_PORT]


def test_dockerfile_healthcheck_hits_healthz_on_the_served_port() -> None:
    healthcheck = docker_one("HEALTHCHECK")
    match = re.search(r"\bCMD\s+(\[.*\])$", healthcheck)
    assert match, f"HEALTHCHECK must use the exec form: {healthcheck!r}"
    url = urlparse(healthcheck_url(json.loads(match.group(1))))
    port = serve_settings(json.loads(docker_one("CMD"))).port
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", port, "/healthz")


# ----------------------------------------------------------------------------- docker-compose.yml


def compose() -> dict[str, str]:
    return mapping(read(DEPLOY / "docker-compose.yml"))


def services() -> dict[str, str]:
    return mapping(compose()["services"])


def service(name: str) -> dict[str, str]:
    return mapping(services()[name])


def compose_env(name: str) -> dict[str, str]:
    return {key: scalar(value) for key, value in mapping(service(name)["environment"]).items()}


def compose_list(name: str, key: str) -> list[str]:
    return [scalar(item) for item in items(service(name)[key])]


def bind_mounts(name: str) -> dict[str, str]:
    """{target: source} of the relative bind mounts (named volumes are left out)."""
    mounts = {}
    for volume in compose_list(name, "volumes"):
        source, target, *mode = volume.split(":")
        if source.startswith("."):
            assert mode == ["ro"], f"{name}: mount {volume} read-only"
            mounts[target] = source
    return mounts


def test_compose_runs_postgres_pgbouncer_migrate_two_gateways_prometheus_and_grafana() -> None:
    top = compose()
    assert "version" not in top, "compose spec v2: no `version:` key"
    assert set(services()) == {"postgres", "pgbouncer", "migrate", *GATEWAYS, "prometheus", "grafana"}
    declared_volumes = set(mapping(top["volumes"]))
    for name in services():
        for volume in compose_list(name, "volumes") if "volumes" in service(name) else []:
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in declared_volumes, f"{name}: named volume {source!r} not declared"


def test_compose_postgres_is_16_with_a_pg_isready_healthcheck_and_a_volume() -> None:
    postgres = service("postgres")
    assert scalar(postgres["image"]) == "postgres:16"
    test = flow_list(mapping(postgres["healthcheck"])["test"])
    assert test[0] in {"CMD", "CMD-SHELL"} and "pg_isready" in " ".join(test)
    assert any(v.endswith(":/var/lib/postgresql/data") for v in compose_list("postgres", "volumes"))


def _database_url_points_at_compose_postgres(url: str, host: str = "postgres", port: int = 5432) -> None:
    """`url` reaches the compose database (through `host:port`) as its user, with its password variable."""
    pg_env = compose_env("postgres")
    parsed = urlparse(url.replace(pg_env["POSTGRES_PASSWORD"], "pw"))
    assert parsed.scheme in {"postgres", "postgresql"}
    assert (parsed.hostname, parsed.port) == (host, port)
    assert parsed.username == pg_env["POSTGRES_USER"] and parsed.password == "pw"
    assert parsed.path == "/" + pg_env["POSTGRES_DB"]


def pgbouncer_port() -> int:
    return int(compose_env("pgbouncer")["LISTEN_PORT"])


def test_compose_pgbouncer_pools_transactions_in_front_of_postgres() -> None:
    pgbouncer, env, pg_env = service("pgbouncer"), compose_env("pgbouncer"), compose_env("postgres")
    assert env["POOL_MODE"] == "transaction"
    assert (env["DB_HOST"], int(env["DB_PORT"])) == ("postgres", 5432)
    assert (env["DB_USER"], env["DB_PASSWORD"], env["DB_NAME"]) == (
        pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"])
    # postgres:16 stores SCRAM verifiers: PgBouncer can only log in for its clients with the plain password
    assert env["AUTH_TYPE"] == "scram-sha-256"
    test = flow_list(mapping(pgbouncer["healthcheck"])["test"])
    assert "pg_isready" in test and test[test.index("-p") + 1] == str(pgbouncer_port())
    assert scalar(mapping(mapping(pgbouncer["depends_on"])["postgres"])["condition"]) == "service_healthy"
    # every gateway worker's pool fits in the client limit
    pool_size = Settings.from_env({"TOKENSFORGE_DB_POOL_SIZE": compose_env("gateway-1")["TOKENSFORGE_DB_POOL_SIZE"]})
    workers = parse(flow_list(service("gateway-1")["command"])).workers
    assert int(env["MAX_CLIENT_CONN"]) >= len(GATEWAYS) * workers * pool_size.db_pool_size


def test_compose_image_is_built_from_the_repo_root_with_deploy_dockerfile() -> None:
    images = {scalar(service(name)["image"]) for name in ("migrate", *GATEWAYS)}
    assert len(images) == 1, f"migrate and the gateways must run the same image: {images}"
    for name in ("migrate", *GATEWAYS):
        build = mapping(service(name)["build"])
        context = (DEPLOY / scalar(build["context"])).resolve()
        assert context == ROOT, "build context is the repository root (see deploy/Dockerfile)"
        assert (context / scalar(build["dockerfile"])).resolve() == DEPLOY / "Dockerfile"


def test_compose_migrate_runs_migrate_once_postgres_is_healthy() -> None:
    migrate = service("migrate")
    args = parse(flow_list(migrate["command"]))
    assert args.command == "migrate"
    _database_url_points_at_compose_postgres(compose_env("migrate")["TOKENSFORGE_DATABASE_URL"])
    depends = mapping(migrate["depends_on"])
    assert scalar(mapping(depends["postgres"])["condition"]) == "service_healthy"


@pytest.mark.parametrize("name", sorted(GATEWAYS))
def test_compose_gateway_serves_the_mounted_catalog_and_is_ready_on_readyz(name: str) -> None:
    gateway = service(name)
    env = compose_env(name)
    settings = serve_settings(flow_list(gateway["command"]), env={k: v for k, v in env.items()
                                                                   if k == "TOKENSFORGE_CONFIG"})
    assert settings.host == "0.0.0.0" and settings.port == CONTAINER_PORT

    mounts = bind_mounts(name)
    assert PurePosixPath(str(settings.config_path)) in {PurePosixPath(t) for t in mounts}, mounts
    assert (DEPLOY / mounts[str(settings.config_path)]).resolve() == CATALOG

    assert compose_list(name, "ports") == [f"{GATEWAYS[name]}:{settings.port}"]

    url = urlparse(healthcheck_url(flow_list(mapping(gateway["healthcheck"])["test"])))
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", settings.port, "/readyz")

    depends = mapping(gateway["depends_on"])
    assert scalar(mapping(depends["migrate"])["condition"]) == "service_completed_successfully"
    assert scalar(mapping(depends["pgbouncer"])["condition"]) == "service_healthy"

    # the pool through PgBouncer, with unnamed statements only; migrations and LISTEN straight to postgres
    _database_url_points_at_compose_postgres(env["TOKENSFORGE_DATABASE_URL"], "pgbouncer", pgbouncer_port())
    _database_url_points_at_compose_postgres(env["TOKENSFORGE_DIRECT_DATABASE_URL"])
    pooled = Settings.from_env({k: v for k, v in env.items() if k.startswith("TOKENSFORGE_DB_")})
    assert pooled.db_statement_cache_size == 0
    assert re.fullmatch(r"\$\{TOKENSFORGE_ADMIN_TOKEN(:\?[^}]*)?\}", env["TOKENSFORGE_ADMIN_TOKEN"])


def test_compose_gateways_differ_only_in_their_published_port() -> None:
    blocks = [services()[name].replace(f'"{port}:', '"PORT:') for name, port in GATEWAYS.items()]
    strip = [[line for line in block.splitlines() if not _is_comment(line)] for block in blocks]
    assert strip[0] == strip[1]


def test_compose_environment_names_are_ones_the_gateway_reads() -> None:
    for name in ("migrate", *GATEWAYS):
        env = compose_env(name)
        unknown = {key for key in env if key.startswith("TOKENSFORGE_")} - KNOWN_TOKENSFORGE_ENV
        assert not unknown, f"{name}: no such setting {unknown}"
        Settings.from_env({k: v for k, v in env.items() if "${" not in v})  # tunables must parse


def test_every_catalog_api_key_env_is_passed_to_the_compose_gateways_from_the_host() -> None:
    for name in GATEWAYS:
        env = compose_env(name)
        for var in catalog_key_envs():
            assert var in env, f"{name} lacks {var} (api_key_env of a catalog channel)"
            # the secret comes from the operator's environment, never from this file
            assert re.fullmatch(rf"\$\{{{var}(:\?[^}}]*)?\}}", env[var]), env[var]


def test_compose_monitoring_mounts_and_ports() -> None:
    prometheus = bind_mounts("prometheus")
    assert prometheus == {"/etc/prometheus/prometheus.yml": "./prometheus/prometheus.yml",
                          "/etc/prometheus/alerts.yml": "./prometheus/alerts.yml"}
    assert scalar(service("prometheus")["image"]).startswith("prom/prometheus")
    assert compose_list("prometheus", "ports") == ["9090:9090"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in flow_list(service("prometheus")["command"])

    grafana = bind_mounts("grafana")
    assert grafana == {"/etc/grafana/provisioning": "./grafana/provisioning",
                       "/var/lib/grafana/dashboards/tokensforge-dashboard.json":
                           "./grafana/tokensforge-dashboard.json"}
    assert scalar(service("grafana")["image"]).startswith("grafana/grafana")
    assert compose_list("grafana", "ports") == ["3000:3000"]


def test_every_compose_bind_mount_source_exists_in_the_repo() -> None:
    # deploy/prometheus/* and deploy/grafana/* belong to the monitoring half of deploy/: this test is
    # red until they exist, because `docker compose up` would mount empty directories in their place.
    missing = [f"{name}: {source}" for name in services() for source in
               (bind_mounts(name).values() if "volumes" in service(name) else [])
               if not (DEPLOY / source).exists()]
    assert not missing, f"bind-mount sources missing under deploy/: {missing}"


def test_prometheus_scrapes_the_compose_gateways_on_their_container_port() -> None:
    config = read(DEPLOY / "prometheus" / "prometheus.yml")
    assert re.search(r"job_name:\s*['\"]?tokensforge['\"]?\s*$", config, re.M)
    targets = set(re.findall(r"\b(gateway-\d+):(\d+)\b", config))
    assert targets == {(name, str(CONTAINER_PORT)) for name in GATEWAYS}
    assert "alerts.yml" in config


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    provider = read(DEPLOY / "grafana" / "provisioning" / "dashboards" / "tokensforge.yml")
    paths = re.findall(r"^\s*path:\s*['\"]?([^'\"\s]+)", provider, re.M)
    assert paths and all(p.rstrip("/") == "/var/lib/grafana/dashboards" for p in paths), paths
    datasource = read(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    urls = re.findall(r"^\s*url:\s*['\"]?([^'\"\s]+)", datasource, re.M)
    assert urls and all(urlparse(u).hostname == "prometheus" and urlparse(u).port == 9090 for u in urls)


# ----------------------------------------------------------------------------- Kubernetes


def manifest(name: str) -> dict[str, str]:
    doc = mapping(read(K8S / name))
    assert "namespace" not in mapping(doc["metadata"]), f"{name}: keep manifests namespace-less"
    return doc


def meta_name(doc: dict[str, str]) -> str:
    return scalar(mapping(doc["metadata"])["name"])


def container(doc: dict[str, str]) -> dict[str, str]:
    containers = items(path(doc["spec"], "template", "spec", "containers"))
    assert len(containers) == 1
    return mapping(containers[0])


def k8s_env(ctr: dict[str, str]) -> dict[str, dict[str, str]]:
    """{name: {"value": …} or {"secret": …, "key": …}}"""
    env: dict[str, dict[str, str]] = {}
    for item in items(ctr["env"]):
        fields = mapping(item)
        name = scalar(fields["name"])
        if "valueFrom" in fields:
            ref = mapping(path(fields["valueFrom"], "secretKeyRef"))
            env[name] = {"secret": scalar(ref["name"]), "key": scalar(ref["key"])}
        else:
            env[name] = {"value": scalar(fields["value"])}
    return env


def secret_data() -> dict[str, str]:
    return {key: scalar(value) for key, value in mapping(manifest("secret-example.yaml")["stringData"]).items()}


def labels(text: str) -> dict[str, str]:
    return {key: scalar(value) for key, value in mapping(text).items()}


def probe(ctr: dict[str, str], kind: str) -> tuple[str, str]:
    get = mapping(path(ctr[kind], "httpGet"))
    return scalar(get["path"]), scalar(get["port"])


@pytest.mark.parametrize(("name", "api_version", "kind"), [
    ("configmap-catalog.yaml", "v1", "ConfigMap"),
    ("secret-example.yaml", "v1", "Secret"),
    ("deployment.yaml", "apps/v1", "Deployment"),
    ("service.yaml", "v1", "Service"),
    ("hpa.yaml", "autoscaling/v2", "HorizontalPodAutoscaler"),
    ("migration-job.yaml", "batch/v1", "Job"),
])
def test_k8s_manifest_kinds(name: str, api_version: str, kind: str) -> None:
    doc = manifest(name)
    assert (scalar(doc["apiVersion"]), scalar(doc["kind"])) == (api_version, kind)


def test_deployment_serves_the_configmap_catalog_on_the_named_port() -> None:
    doc = manifest("deployment.yaml")
    ctr = container(doc)
    env = {name: ref["value"] for name, ref in k8s_env(ctr).items() if "value" in ref}
    settings = serve_settings(flow_list(ctr["args"]), env=env)  # tunables in env must parse too
    assert settings.host == "0.0.0.0" and settings.workers == 2

    ports = [mapping(item) for item in items(ctr["ports"])]
    assert [(scalar(p["name"]), int(scalar(p["containerPort"]))) for p in ports] == [("http", settings.port)]
    assert settings.port == CONTAINER_PORT

    # the catalog file the gateway reads is the ConfigMap's key, mounted as a directory
    config = PurePosixPath(str(settings.config_path))
    mounts = {scalar(mapping(m)["name"]): mapping(m) for m in items(ctr["volumeMounts"])}
    volumes = {scalar(mapping(v)["name"]): mapping(v) for v in items(path(doc["spec"], "template", "spec",
                                                                          "volumes"))}
    (catalog_volume,) = [n for n, m in mounts.items() if PurePosixPath(scalar(m["mountPath"])) == config.parent]
    assert scalar(mounts[catalog_volume]["readOnly"]) == "true"
    configmap = manifest("configmap-catalog.yaml")
    assert scalar(mapping(volumes[catalog_volume]["configMap"])["name"]) == meta_name(configmap)
    assert config.name in mapping(configmap["data"])


def test_deployment_probes_use_readyz_and_healthz_on_the_http_port() -> None:
    ctr = container(manifest("deployment.yaml"))
    assert probe(ctr, "readinessProbe") == ("/readyz", "http")
    assert probe(ctr, "livenessProbe") == ("/healthz", "http")
    if "startupProbe" in ctr:
        assert probe(ctr, "startupProbe") == ("/healthz", "http")


def test_deployment_scrape_annotations_replicas_resources_and_draining() -> None:
    doc = manifest("deployment.yaml")
    spec = mapping(doc["spec"])
    assert int(scalar(spec["replicas"])) == 2
    template = mapping(spec["template"])
    pod_labels = labels(path(template["metadata"], "labels"))
    assert labels(path(spec["selector"], "matchLabels")).items() <= pod_labels.items()

    ctr = container(doc)
    annotations = labels(path(template["metadata"], "annotations"))
    port = serve_settings(flow_list(ctr["args"])).port
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}

    resources = mapping(ctr["resources"])
    for section in ("requests", "limits"):
        assert set(mapping(resources[section])) >= {"cpu", "memory"}, section

    sleep = flow_list(path(ctr["lifecycle"], "preStop", "exec", "command"))
    assert sleep[0] == "sleep" and int(sleep[1]) > 0
    grace = int(scalar(mapping(template["spec"])["terminationGracePeriodSeconds"]))
    # preStop sleep, then SIGTERM gives in-flight requests 10 s (server.running's shutdown_timeout)
    assert grace >= 20 and grace > int(sleep[1]) + 10

    security = mapping(path(template["spec"], "securityContext"))
    assert scalar(security["runAsNonRoot"]) == "true"
    assert scalar(security["runAsUser"]) == docker_one("USER").split(":")[0], "the image's user"


def test_deployment_environment_comes_from_the_secret_and_names_real_settings() -> None:
    env = k8s_env(container(manifest("deployment.yaml")))
    secret_name = meta_name(manifest("secret-example.yaml"))
    data = secret_data()
    unknown = {name for name in env if name.startswith("TOKENSFORGE_")} - KNOWN_TOKENSFORGE_ENV
    assert not unknown, f"no such setting {unknown}"
    assert env["TOKENSFORGE_CONFIG"] == {"value": str(CONFIG_PATH)}
    for name in ("TOKENSFORGE_DATABASE_URL", "TOKENSFORGE_ADMIN_TOKEN", *sorted(catalog_key_envs())):
        assert name in env, f"the Deployment does not set {name}"
        assert env[name].get("secret") == secret_name, f"{name} must come from the Secret"
    for name, ref in env.items():
        if "secret" in ref:
            assert ref["secret"] == secret_name and ref["key"] in data, f"{name}: {ref} not in the Secret"


def test_secret_example_holds_only_placeholders() -> None:
    text = read(K8S / "secret-example.yaml")
    assert "PLACEHOLDER" in text
    data = secret_data()
    assert set(data) >= {"TOKENSFORGE_DATABASE_URL", "TOKENSFORGE_ADMIN_TOKEN", *catalog_key_envs()}
    for key, value in data.items():
        assert "CHANGE-ME" in value, f"{key}: placeholder values only"
    assert urlparse(data["TOKENSFORGE_DATABASE_URL"]).scheme in {"postgres", "postgresql"}


def test_service_exposes_port_80_to_the_named_container_port() -> None:
    svc = mapping(manifest("service.yaml")["spec"])
    (port,) = [mapping(item) for item in items(svc["ports"])]
    assert int(scalar(port["port"])) == 80 and scalar(port["targetPort"]) == "http"
    deployment = mapping(manifest("deployment.yaml")["spec"])
    pod_labels = labels(path(deployment["template"], "metadata", "labels"))
    assert labels(svc["selector"]).items() <= pod_labels.items()


def test_hpa_scales_the_deployment_on_cpu_between_2_and_10() -> None:
    spec = mapping(manifest("hpa.yaml")["spec"])
    target = labels(spec["scaleTargetRef"])
    deployment = manifest("deployment.yaml")
    assert target == {"apiVersion": scalar(deployment["apiVersion"]), "kind": "Deployment",
                      "name": meta_name(deployment)}
    assert (int(scalar(spec["minReplicas"])), int(scalar(spec["maxReplicas"]))) == (2, 10)
    (metric,) = [mapping(item) for item in items(spec["metrics"])]
    resource = mapping(metric["resource"])
    assert scalar(metric["type"]) == "Resource" and scalar(resource["name"]) == "cpu"
    assert scalar(mapping(resource["target"])["type"]) == "Utilization"
    # utilization is measured against the request
    assert "cpu" in mapping(path(container(deployment)["resources"], "requests"))


def test_migration_job_runs_migrate_with_the_database_url_from_the_secret() -> None:
    job = manifest("migration-job.yaml")
    ctr = container(job)
    assert parse(flow_list(ctr["args"])).command == "migrate"
    env = k8s_env(ctr)
    assert env["TOKENSFORGE_DATABASE_URL"] == {"secret": meta_name(manifest("secret-example.yaml")),
                                               "key": "TOKENSFORGE_DATABASE_URL"}
    assert all(ref.get("key") in secret_data() for ref in env.values() if "secret" in ref)
    assert scalar(ctr["image"]) == scalar(container(manifest("deployment.yaml"))["image"])
    assert scalar(path(job["spec"], "template", "spec", "restartPolicy")) in {"Never", "OnFailure"}
    assert "advisory lock" in read(K8S / "migration-job.yaml"), "say why the Job is only an optimisation"


# ----------------------------------------------------------------------------- the catalog


def embedded_catalog() -> str:
    block = mapping(manifest("configmap-catalog.yaml")["data"])["catalog.toml"]
    header, *lines = block.split("\n")
    assert header.strip() == "|", "embed the catalog as a literal block scalar (`catalog.toml: |`)"
    width = min(_indent(line) for line in lines if line.strip())
    for line in lines:
        assert not line.strip() or line[:width] == " " * width, f"under-indented: {line!r}"
    return "\n".join(line[width:] for line in lines).rstrip("\n") + "\n"


def test_configmap_embeds_the_example_catalog_verbatim_and_it_loads(tmp_path: Path) -> None:
    embedded = embedded_catalog()
    assert embedded == read(CATALOG), "deploy/k8s/configmap-catalog.yaml drifted from catalog.example.toml"
    written = tmp_path / "catalog.toml"
    written.write_text(embedded, encoding="utf-8")
    catalog = load_catalog(written)
    assert set(catalog.models) == set(load_catalog(CATALOG).models)


def test_example_catalog_is_production_shaped() -> None:
    catalog: Catalog = load_catalog(CATALOG)
    assert "{upstream}" not in read(CATALOG)
    for channel in catalog.channels.values():
        assert channel.base_url.startswith("https://"), channel
        assert channel.api_key_env, f"{channel.id}: secrets come from the environment"
    for model in catalog.models.values():
        official = model.route("official")
        routed = model.route("routed")
        assert official is not None and routed is not None, model.id
        assert official.bucket == "credit" and routed.bucket == "routed"
        assert {catalog.channels[ref.channel].base_url for ref in official.channels} == {
            "https://api.openai.com/v1"}
        relays = [ref.channel for ref in routed.channels]
        assert len(relays) >= 2 and len(set(relays)) == len(relays), f"{routed.id}: a relay and a backup"
        assert routed.input_price < official.input_price


# ----------------------------------------------------------------------------- Kubernetes API schemas
# kubernetes-validate (PyPI) bundles the Kubernetes API's OpenAPI schemas per release and validates with
# jsonschema, so every field name, type and required field is checked offline (kubectl --dry-run=server
# would need a cluster; kubeconform is no Debian or PyPI package). Strict: an unknown field fails.

K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())  # the oldest release we claim, the newest known


def k8s_doc(name: str) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(read(K8S / name)))
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{name}: one document"
    return docs[0]


def k8s_pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc["spec"]["template"]["spec"])


def k8s_quantity(value: str | int) -> float:
    """A CPU or memory quantity in base units ("500m" → 0.5, "1Gi" → 2**30)."""
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml")))
def test_k8s_manifest_is_valid_for_the_kubernetes_api(name: str, version: str) -> None:
    kubernetes_validate.validate(k8s_doc(name), version, strict=True)


def test_the_schema_validator_is_real() -> None:
    """What a typo or a wrong type in a manifest looks like to it: a failure, not a pass."""
    doc = k8s_doc("deployment.yaml")
    doc["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    doc = k8s_doc("deployment.yaml")
    k8s_pod_spec(doc)["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8080]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("name", ["deployment.yaml", "migration-job.yaml"])
def test_k8s_pods_run_as_non_root_with_resource_limits(name: str) -> None:
    pod = k8s_pod_spec(k8s_doc(name))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == docker_one("USER").split(":")[0]
    assert pod["automountServiceAccountToken"] is False
    for ctr in pod["containers"]:
        security = ctr["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
        assert security["readOnlyRootFilesystem"] is True
        resources = ctr["resources"]
        for what in ("cpu", "memory"):
            request, limit = resources["requests"][what], resources["limits"][what]
            assert 0 < k8s_quantity(request) <= k8s_quantity(limit), (name, what, request, limit)


def test_k8s_gateway_probes_and_draining() -> None:
    pod = k8s_pod_spec(k8s_doc("deployment.yaml"))
    (ctr,) = pod["containers"]
    port = next(p for p in ctr["ports"] if p["name"] == "http")["containerPort"]
    assert port == serve_settings(ctr["args"]).port == CONTAINER_PORT
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # liveness must not fail on a database outage (that is readiness' job): only /healthz, and slower
    assert ctr["livenessProbe"]["periodSeconds"] >= ctr["readinessProbe"]["periodSeconds"]
    startup = ctr["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "migrations at start take time"
    sleep = ctr["lifecycle"]["preStop"]["exec"]["command"]
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + 10  # + the 10 s drain after SIGTERM


def test_k8s_migration_job_applies_the_schema_once() -> None:
    job = k8s_doc("migration-job.yaml")
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] >= 1
    pod = k8s_pod_spec(job)
    assert pod["restartPolicy"] == "Never"
    (ctr,) = pod["containers"]
    assert parse(ctr["args"]).command == "migrate"
    (gateway,) = k8s_pod_spec(k8s_doc("deployment.yaml"))["containers"]
    assert ctr["image"] == gateway["image"], "the Job migrates to the schema of the image it deploys"


def test_k8s_hpa_owns_the_gateway_count_within_the_database_connections() -> None:
    hpa, deployment = k8s_doc("hpa.yaml"), k8s_doc("deployment.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": deployment["apiVersion"], "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert 2 <= hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
    (ctr,) = k8s_pod_spec(deployment)["containers"]
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    workers = serve_settings(ctr["args"]).workers
    # each worker: its pool plus one LISTEN connection; the comment in deployment.yaml says the total
    connections = hpa["spec"]["maxReplicas"] * workers * (int(env["TOKENSFORGE_DB_POOL_SIZE"]) + 1)
    assert f"= {connections} connections at maxReplicas" in read(K8S / "deployment.yaml")


def _pooled(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.port == 6432 or "bouncer" in (parsed.hostname or "")


def test_the_direct_database_url_is_set_wherever_a_pooler_is_used() -> None:
    # compose: the gateways go through PgBouncer; migrations and LISTEN straight to postgres
    for name in GATEWAYS:
        env = compose_env(name)
        assert _pooled(env["TOKENSFORGE_DATABASE_URL"]) and not _pooled(env["TOKENSFORGE_DIRECT_DATABASE_URL"])
        assert env["TOKENSFORGE_DB_STATEMENT_CACHE_SIZE"] == "0"
    assert not _pooled(compose_env("migrate")["TOKENSFORGE_DATABASE_URL"])
    # Kubernetes: the Secret holds both URLs (the direct one never a pooler's), and both the gateway and the
    # migration Job read both, so pointing TOKENSFORGE_DATABASE_URL at a pooler is a one-key change
    data = secret_data()
    assert not _pooled(data["TOKENSFORGE_DIRECT_DATABASE_URL"])
    for name in ("deployment.yaml", "migration-job.yaml"):
        (ctr,) = k8s_pod_spec(k8s_doc(name))["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in ctr["env"] if "valueFrom" in e}
        assert refs["TOKENSFORGE_DATABASE_URL"] == "TOKENSFORGE_DATABASE_URL", name
        assert refs["TOKENSFORGE_DIRECT_DATABASE_URL"] == "TOKENSFORGE_DIRECT_DATABASE_URL", name
    assert 'name: TOKENSFORGE_DB_STATEMENT_CACHE_SIZE\n            #   value: "0"' in read(K8S / "deployment.yaml")
