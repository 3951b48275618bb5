"""The deployment files: deploy/k8s/*.yaml, Dockerfile, .dockerignore, docker-compose.yml.

No cluster, Docker or service is needed: the manifests are validated offline against the
Kubernetes schemas that kubernetes-validate ships, and the files are checked against each
other, against ``aura.config.Settings`` and against the seed's debug commands
(``kubectl exec -it deployment/rabbitmq -n aura-platform -- rabbitmqctl list_queues ...``).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from aura.config import Settings, load_settings
from aura.contract import BULK_QUEUE, REALTIME_QUEUE

Manifest = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
NAMESPACE = "aura-platform"
# A version kubernetes-validate ships schemas for (it picks the newest one not above it).
KUBERNETES_VERSION = "1.32.0"

GATEWAY = "api-gateway"
WORKER = "intelligence-worker"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# What the seed's debug commands run in each Deployment (None: only `kubectl logs`).
SEED_DEBUG_TARGETS = {
    "rabbitmq": "rabbitmqctl",
    "redis": "redis-cli",
    WORKER: None,
    GATEWAY: None,
}
# Official images that ship the seed's tools (rabbitmqctl, redis-cli) and pg_isready.
OFFICIAL_IMAGES = {
    "rabbitmq": "rabbitmq:3.13-management",
    "redis": "redis:7",
    "postgres": "postgres:16",
}
SEED_VARIABLES = (
    "DB_POOL_SIZE",
    "DB_MAX_OVERFLOW",
    "DB_POOL_RECYCLE",
    "CELERY_TASK_SOFT_TIME_LIMIT",
    "CELERY_TASK_HARD_TIME_LIMIT",
    "CELERY_WORKER_MAX_TASKS_PER_CHILD",
    "RETRY_TRACKER_MAX_RETRIES",
    "RETRY_TRACKER_TTL",
    "CIRCUIT_BREAKER_FAIL_MAX",
    "CIRCUIT_BREAKER_RESET_TIMEOUT",
)
SETTINGS_VARIABLES = frozenset(name.upper() for name in Settings.model_fields)
# Variables Aura does not read but the third-party images (or prometheus_client) do.
THIRD_PARTY_VARIABLES = re.compile(
    r"POSTGRES_[A-Z]+|RABBITMQ_DEFAULT_[A-Z]+|PROMETHEUS_MULTIPROC_DIR"
)


# --- reading the files --------------------------------------------------------------------


def _load_documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def _objects() -> tuple[Manifest, ...]:
    return tuple(doc for path in MANIFESTS for doc in _load_documents(path))


def _find(kind: str, name: str) -> Manifest:
    found = [o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def _workloads() -> dict[str, Manifest]:
    return {o["metadata"]["name"]: o for o in _objects() if o["kind"] in WORKLOAD_KINDS}


def _pod(workload: str) -> Manifest:
    assert workload in _workloads(), f"no Deployment or StatefulSet {workload!r}"
    spec: Manifest = _workloads()[workload]["spec"]["template"]["spec"]
    return spec


def _container(workload: str) -> Manifest:
    """The container `kubectl exec/logs deployment/NAME` lands in (without -c)."""
    template = _workloads()[workload]["spec"]["template"]
    containers = template["spec"]["containers"]
    annotations = template["metadata"].get("annotations", {})
    default = annotations.get("kubectl.kubernetes.io/default-container", containers[0]["name"])
    chosen: Manifest = next(c for c in containers if c["name"] == default)
    return chosen


def _all_containers() -> list[tuple[str, Manifest]]:
    return [
        (name, container)
        for name in _workloads()
        for key in ("initContainers", "containers")
        for container in _pod(name).get(key, [])
    ]


def _config() -> dict[str, str]:
    data: dict[str, str] = _find("ConfigMap", "aura-config")["data"]
    return data


def _secrets() -> dict[str, str]:
    secret = _find("Secret", "aura-secrets")
    assert "data" not in secret, "keep the placeholder secrets readable: use stringData"
    data: dict[str, str] = secret["stringData"]
    return data


def _env(container: Manifest) -> dict[str, str]:
    """Every variable a container gets, resolved: envFrom first, then env (which wins).
    Fails on a reference to a ConfigMap, Secret or key that deploy/k8s does not define."""
    sources = {"configMap": ("aura-config", _config()), "secret": ("aura-secrets", _secrets())}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ((kind, ref),) = source.items()
        name, data = sources[kind.removesuffix("Ref")]
        assert ref["name"] == name, f"{container['name']}: {kind} to unknown {ref['name']!r}"
        env |= data
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        ((kind, ref),) = variable["valueFrom"].items()
        name, data = sources[kind.removesuffix("KeyRef")]
        assert ref["name"] == name, f"{variable['name']}: unknown {ref['name']!r}"
        assert ref["key"] in data, f"{variable['name']}: {name} has no key {ref['key']!r}"
        env[variable["name"]] = data[ref["key"]]
    return env


def _container_port(container: Manifest, port: int | str) -> int:
    """A probe's or Service's port (a number, or a containerPort's name) as a number."""
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, int):
        assert port in ports.values(), f"{container['name']} does not listen on {port}"
        return port
    assert port in ports, f"{container['name']} has no port named {port!r}"
    return int(ports[port])


@functools.cache
def _compose() -> Manifest:
    compose: Manifest = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


def _interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}``, ``${NAME-default}``, ``${NAME}``, with nothing set."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m[1] or "", value)


def _compose_env(service: str) -> dict[str, str]:
    environment = _compose()["services"][service].get("environment", {})
    assert isinstance(environment, dict), f"compose {service}: environment as a mapping"
    return {name: _interpolate(str(value)) for name, value in environment.items()}


def _compose_ports(service: str) -> set[int]:
    """Container ports a compose service publishes ("[ip:]host:container[/proto]")."""
    return {
        int(str(p).rsplit(":", 1)[-1].split("/")[0])
        for p in _compose()["services"][service].get("ports", [])
    }


@functools.cache
def _dockerfile() -> tuple[tuple[str, str], ...]:
    """The Dockerfile's instructions (keyword, arguments), continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
    return tuple(instructions)


def _instructions(keyword: str) -> list[str]:
    return [arguments for found, arguments in _dockerfile() if found == keyword]


def _image() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return f"{project['name']}:{project['version']}"


# --- Kubernetes manifests -----------------------------------------------------------------


def test_manifests_are_there() -> None:
    names = {path.name for path in MANIFESTS}
    assert {"namespace.yaml", "configmap.yaml", "secret.yaml"} <= names
    assert {f"{name}.yaml" for name in (GATEWAY, WORKER, "rabbitmq", "redis", "postgres")} <= names


def test_kustomization_applies_every_manifest_namespace_first() -> None:
    resources = yaml.safe_load((K8S / "Kustomization").read_text())["resources"]
    assert resources[0] == "namespace.yaml"
    assert sorted(resources) == [path.name for path in MANIFESTS]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_validates_against_kubernetes_schemas(path: Path) -> None:
    documents = _load_documents(path)
    assert documents, f"{path.name} holds no document"
    for document in documents:
        what = f"{path.name}: {document.get('kind')}/{document.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{what} at {where or '(top)'}: {exc.message}", pytrace=False)
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{what}: {exc.message}", pytrace=False)


def test_validation_is_strict() -> None:
    """The check above would catch a misspelt field: unknown fields are errors."""
    deployment = copy.deepcopy(_find("Deployment", GATEWAY))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_everything_is_in_the_namespace() -> None:
    assert _find("Namespace", NAMESPACE)
    outside = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in _objects()
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE
    ]
    assert not outside, f"not in namespace {NAMESPACE}: {outside}"


@pytest.mark.parametrize(("name", "tool"), SEED_DEBUG_TARGETS.items())
def test_seed_debug_commands_find_their_deployment(name: str, tool: str | None) -> None:
    deployment = _find("Deployment", name)
    template = deployment["spec"]["template"]
    assert (
        template["metadata"]["labels"].items()
        >= deployment["spec"]["selector"]["matchLabels"].items()
    )
    assert _container(name)["name"] == name, "kubectl exec/logs without -c must land here"
    if tool is not None:
        assert _container(name)["image"] == OFFICIAL_IMAGES[name], f"{tool} comes with it"


def test_seed_debug_commands_see_aura_data() -> None:
    """`redis-cli keys "retry_count:*"` reads db 0; `rabbitmqctl list_queues` vhost "/"."""
    redis = urlsplit(_config()["REDIS_URL"])
    assert redis.path in ("", "/", "/0"), "REDIS_URL must use db 0 for the seed's redis-cli"
    broker = urlsplit(_secrets()["CELERY_BROKER_URL"])
    assert broker.path == "//", "CELERY_BROKER_URL must use vhost '/' (a trailing '//')"


def test_third_party_images_are_the_official_ones() -> None:
    for name, image in OFFICIAL_IMAGES.items():
        assert _container(name)["image"] == image


def test_env_names_are_settings_or_third_party() -> None:
    names = {("ConfigMap", n) for n in _config()} | {("Secret", n) for n in _secrets()}
    for workload, container in _all_containers():
        names |= {(f"{workload}/{container['name']}", v["name"]) for v in container.get("env", [])}
    unknown = sorted(
        (where, name)
        for where, name in names
        if name not in SETTINGS_VARIABLES and not THIRD_PARTY_VARIABLES.fullmatch(name)
    )
    assert not unknown, f"neither a Settings field nor a third-party image's variable: {unknown}"


def test_config_map_holds_no_secret_and_no_third_party_variable() -> None:
    assert set(_config()) <= SETTINGS_VARIABLES
    assert not set(_config()) & {"DATABASE_URL", "CELERY_BROKER_URL", "LLM_API_KEY"}


def test_every_setting_is_set_explicitly() -> None:
    missing = SETTINGS_VARIABLES - set(_config()) - set(_secrets())
    assert not missing, f"add to aura-config or aura-secrets: {sorted(missing)}"


@pytest.mark.parametrize("name", SEED_VARIABLES)
def test_seed_variables_have_the_defaults(name: str) -> None:
    default = Settings.model_fields[name.lower()].default
    assert float(_config()[name]) == float(default)


@pytest.mark.parametrize("workload", [GATEWAY, WORKER])
def test_app_environment_loads(workload: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(_container(workload))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.celery_task_hard_time_limit == float(_config()["CELERY_TASK_HARD_TIME_LIMIT"])
    assert settings.worker_metrics_port == int(_config()["WORKER_METRICS_PORT"])
    assert settings.database_url == _secrets()["DATABASE_URL"]
    assert settings.celery_broker_url == _secrets()["CELERY_BROKER_URL"]
    assert settings.redis_url == _config()["REDIS_URL"]
    assert settings.llm_api_key.get_secret_value() == _secrets()["LLM_API_KEY"]


def test_credentials_in_the_urls_match_the_servers() -> None:
    database = urlsplit(_secrets()["DATABASE_URL"])
    postgres = _env(_container("postgres"))
    assert database.scheme == "postgresql+asyncpg"
    assert (database.username, database.password) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
    )
    assert database.path == f"/{postgres['POSTGRES_DB']}"
    assert postgres["POSTGRES_PASSWORD"] == _secrets()["POSTGRES_PASSWORD"]

    broker = urlsplit(_secrets()["CELERY_BROKER_URL"])
    rabbitmq = _env(_container("rabbitmq"))
    assert broker.scheme == "amqp"
    assert (broker.username, broker.password) == (
        rabbitmq["RABBITMQ_DEFAULT_USER"],
        rabbitmq["RABBITMQ_DEFAULT_PASS"],
    )
    assert rabbitmq["RABBITMQ_DEFAULT_PASS"] == _secrets()["RABBITMQ_DEFAULT_PASS"]


@pytest.mark.parametrize(
    ("url", "service", "port"),
    [
        ("DATABASE_URL", "postgres", 5432),
        ("CELERY_BROKER_URL", "rabbitmq", 5672),
        ("REDIS_URL", "redis", 6379),
    ],
)
def test_urls_point_to_the_services(url: str, service: str, port: int) -> None:
    parts = urlsplit({**_config(), **_secrets()}[url])
    assert (parts.hostname, parts.port) == (service, port)
    assert port in {p["port"] for p in _find("Service", service)["spec"]["ports"]}


@pytest.mark.parametrize(
    ("service", "port"),
    [(GATEWAY, 8000), ("rabbitmq", 5672), ("redis", 6379), ("postgres", 5432), (WORKER, 9100)],
)
def test_services_reach_their_pods(service: str, port: int) -> None:
    spec = _find("Service", service)["spec"]
    matching = [
        name
        for name, workload in _workloads().items()
        if workload["spec"]["template"]["metadata"]["labels"].items() >= spec["selector"].items()
    ]
    assert matching == [service], f"Service {service} selects {matching}"
    (exposed,) = (p for p in spec["ports"] if p["port"] == port)
    assert _container_port(_container(service), exposed.get("targetPort", port)) == port


def test_app_containers_run_the_project_image() -> None:
    gateway, worker = _container(GATEWAY), _container(WORKER)
    assert gateway["image"] == worker["image"] == _image()
    assert gateway["command"] == ["aura", "gateway", "--host", "0.0.0.0", "--port", "8000"]
    assert worker["command"][:2] == ["aura", "worker"]
    queues = worker["command"][worker["command"].index("--queues") + 1]
    assert set(queues.split(",")) == {REALTIME_QUEUE, BULK_QUEUE}
    for container in (gateway, worker):
        assert [next(iter(source.values()))["name"] for source in container["envFrom"]] == [
            "aura-config",
            "aura-secrets",
        ]


@pytest.mark.parametrize("workload", [GATEWAY, WORKER])
def test_schema_is_upgraded_before_the_app_starts(workload: str) -> None:
    (init,) = _pod(workload)["initContainers"]
    assert init["command"] == ["aura", "db", "upgrade"]
    assert init["image"] == _container(workload)["image"]
    assert _env(init)["DATABASE_URL"] == _env(_container(workload))["DATABASE_URL"]


def test_gateway_probes() -> None:
    gateway = _container(GATEWAY)
    port = int(gateway["command"][gateway["command"].index("--port") + 1])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = gateway[probe]["httpGet"]
        assert http["path"] == path
        assert _container_port(gateway, http["port"]) == port


def test_worker_metrics_endpoint() -> None:
    worker = _container(WORKER)
    port = int(_config()["WORKER_METRICS_PORT"])
    http = worker["livenessProbe"]["httpGet"]
    assert http["path"] == "/metrics"
    assert _container_port(worker, http["port"]) == port
    directory = _env(worker)["PROMETHEUS_MULTIPROC_DIR"]
    (mount,) = (m for m in worker["volumeMounts"] if m["mountPath"] == directory)
    (volume,) = (v for v in _pod(WORKER)["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume, "the multiprocess files must start empty with each pod"
    # The gateway is one process: in multiprocess mode its /metrics would read no files.
    assert "PROMETHEUS_MULTIPROC_DIR" not in _env(_container(GATEWAY))


@pytest.mark.parametrize("workload", [GATEWAY, WORKER])
def test_prometheus_scrape_annotations(workload: str) -> None:
    annotations = _workloads()[workload]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert _container_port(_container(workload), int(annotations["prometheus.io/port"]))


def test_worker_grace_period_outlasts_the_hard_time_limit() -> None:
    grace = _pod(WORKER)["terminationGracePeriodSeconds"]
    assert grace > float(_config()["CELERY_TASK_HARD_TIME_LIMIT"])
    assert _pod(GATEWAY)["terminationGracePeriodSeconds"] >= 10


def test_every_container_has_resources() -> None:
    lacking = [
        f"{workload}/{container['name']}"
        for workload, container in _all_containers()
        if any(
            resource not in container.get("resources", {}).get(bound, {})
            for bound in ("requests", "limits")
            for resource in ("cpu", "memory")
        )
    ]
    assert not lacking, f"requests and limits (cpu, memory) missing: {lacking}"


@pytest.mark.parametrize("workload", [GATEWAY, WORKER])
def test_app_pods_run_as_the_image_user(workload: str) -> None:
    security = _pod(workload)["securityContext"]
    assert security["runAsNonRoot"] is True
    (user,) = _instructions("USER")
    assert str(security["runAsUser"]) == user.split(":")[0]


# --- docker-compose.yml -------------------------------------------------------------------


def test_compose_runs_the_same_services() -> None:
    services = _compose()["services"]
    # Besides the workloads, compose runs the app pods' init containers once, by name.
    init_commands = {
        c["name"]: c["command"] for name in (GATEWAY, WORKER) for c in _pod(name)["initContainers"]
    }
    assert services.keys() - init_commands.keys() == set(_workloads())
    for name in services.keys() & init_commands.keys():
        assert services[name]["command"] == init_commands[name]
        assert services[name]["restart"] != "unless-stopped", f"{name} runs once"


@pytest.mark.parametrize("service", [GATEWAY, WORKER, "db-upgrade"])
def test_compose_app_services_build_the_same_image(service: str) -> None:
    definition = _compose()["services"][service]
    assert definition["image"] == _container(GATEWAY)["image"]
    assert definition["build"] == "."


@pytest.mark.parametrize("service", [GATEWAY, WORKER])
def test_compose_app_services_match_the_pods(service: str) -> None:
    container = _container(service)
    definition = _compose()["services"][service]
    assert definition["command"] == container["command"]
    assert _compose_ports(service) == {p["containerPort"] for p in container["ports"]}
    k8s_names = set(_config()) | set(_secrets()) | {v["name"] for v in container.get("env", [])}
    assert set(_compose_env(service)) == k8s_names
    assert _compose_env(service) == _env(container), "defaults must be the manifests' values"


def test_compose_app_services_wait_for_healthy_dependencies() -> None:
    services = _compose()["services"]
    for app in (GATEWAY, WORKER):
        depends_on = services[app]["depends_on"]
        for dependency in ("postgres", "redis", "rabbitmq"):
            assert depends_on[dependency]["condition"] == "service_healthy"
            assert services[dependency]["healthcheck"]["test"]
        assert depends_on["db-upgrade"]["condition"] == "service_completed_successfully"
        assert services[app]["healthcheck"]["test"]


@pytest.mark.parametrize("service", ["rabbitmq", "redis", "postgres"])
def test_compose_third_party_services_match_the_pods(service: str) -> None:
    definition = _compose()["services"][service]
    assert definition["image"] == _container(service)["image"]
    assert _compose_env(service) == _env(_container(service))


def test_compose_worker_outlasts_the_hard_time_limit() -> None:
    grace = _compose()["services"][WORKER]["stop_grace_period"]
    assert float(grace.removesuffix("s")) == _pod(WORKER)["terminationGracePeriodSeconds"]


# --- Dockerfile and .dockerignore ---------------------------------------------------------


def test_dockerfile_builds_the_project() -> None:
    assert _instructions("FROM") == ["python:3.11-slim"]
    installs = [run for run in _instructions("RUN") if re.search(r"\bpip install \.(\s|$)", run)]
    assert installs, "the project is installed with `pip install .`"
    assert not any("[dev]" in run for run in _instructions("RUN"))
    (user,) = _instructions("USER")
    assert user.split(":")[0] not in ("0", "root")


def test_dockerfile_exposes_the_container_ports() -> None:
    exposed = {
        int(port.split("/")[0]) for ports in _instructions("EXPOSE") for port in ports.split()
    }
    container_ports = {
        p["containerPort"] for w in (GATEWAY, WORKER) for p in _container(w)["ports"]
    }
    assert exposed == container_ports == {8000, 9100}


def test_dockerfile_runs_the_gateway_by_default() -> None:
    (cmd,) = _instructions("CMD")
    assert json.loads(cmd) == _container(GATEWAY)["command"]


def test_dockerignore_keeps_the_build_context_small_but_complete() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:  # "**/" also matches no directory at all
        return any(
            fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/"))
            for p in patterns
        )

    for path in (".venv", ".git", ".aura", "__pycache__", "src/aura/__pycache__"):
        assert ignored(path), f"{path} belongs out of the build context"
    copied = [source for copy_ in _instructions("COPY") for source in copy_.split()[:-1]]
    assert {"pyproject.toml", "README.md", "src"} <= set(copied)
    assert not [source for source in copied if ignored(source)], "the Dockerfile COPYs it"
