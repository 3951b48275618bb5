"""The high-availability manifests, deploy/k8s/ha (docs/operations/high-availability.md).

Offline, as tests/project/test_deploy.py: the overlay is rendered here as ``kubectl apply -k``
does (resources, then strategic-merge patches; compared with ``kubectl kustomize`` when
kubectl is installed) and validated against kubernetes-validate's schemas, but for
CloudNativePG's ``Cluster`` (a custom resource), checked by hand. Then the files against
each other and against Aura: the broker URL lists the RabbitMQ StatefulSet's pods, the Redis
URL parses with ``aura.redis_connect`` and names the sentinels and the master they monitor
(quorum 2), DATABASE_URL names the Cluster's read-write Service, each stateful set has a
PodDisruptionBudget and anti-affinity, and Aura's part is deploy/k8s's, three settings patched.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from aura.config import load_settings
from aura.gateway.senders import broker_urls
from aura.redis_connect import parse_sentinel_url, validate_redis_url
from tests.project.test_deploy import (
    GATEWAY,
    K8S,
    KUBERNETES_VERSION,
    NAMESPACE,
    OFFICIAL_IMAGES,
    SETTINGS_VARIABLES,
    WORKER,
    _load_documents,
)

Manifest = dict[str, Any]

HA = K8S / "ha"
# Aura's part: deploy/k8s's files, copied (kustomize cannot use a directory above the overlay)
COPIES = ("namespace.yaml", "configmap.yaml", "secret.yaml", f"{GATEWAY}.yaml", f"{WORKER}.yaml")
PATCHED = {
    "ConfigMap": {"REDIS_URL"},
    "Secret": {"DATABASE_URL", "DLQ_DATABASE_URL", "CELERY_BROKER_URL", "POSTGRES_PASSWORD"},
}
THIRD_PARTY_VARIABLES = re.compile(r"RABBITMQ_[A-Z_]+|MY_POD_NAME|PROMETHEUS_MULTIPROC_DIR")
# A pod's DNS name inside the namespace, short or qualified.
POD_HOST = r"{pod}\.{service}(\.aura-platform(\.svc(\.cluster\.local)?)?)?"
SENTINEL_MONITOR = re.compile(r"^sentinel monitor (\S+) (\S+) (\d+) (\d+)$", flags=re.M)


# --- rendering the overlay -----------------------------------------------------------------


def _kustomization() -> Manifest:
    loaded: Manifest = yaml.safe_load((HA / "Kustomization").read_text())
    return loaded


def _merge(target: Manifest, patch: Manifest) -> None:
    """A strategic-merge patch of maps (what patches/ holds): None deletes a key."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@functools.cache
def _objects() -> tuple[Manifest, ...]:
    kustomization = _kustomization()
    objects = [doc for name in kustomization["resources"] for doc in _load_documents(HA / name)]
    for entry in kustomization["patches"]:
        for patch in _load_documents(HA / entry["path"]):
            (target,) = (o for o in objects if _key(o) == _key(patch))
            _merge(target, patch)
    return tuple(objects)


def _key(manifest: Manifest) -> tuple[str, str, str]:
    return manifest["kind"], manifest["metadata"]["name"], manifest["metadata"].get("namespace")


def _find(kind: str, name: str) -> Manifest:
    found = [o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s/ha, found {len(found)}"
    return found[0]


def _of_kind(kind: str) -> list[Manifest]:
    return [o for o in _objects() if o["kind"] == kind]


def _config() -> dict[str, str]:
    return dict(_find("ConfigMap", "aura-config")["data"])


def _secrets() -> dict[str, str]:
    return dict(_find("Secret", "aura-secrets")["stringData"])


def _containers(workload: Manifest) -> list[Manifest]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _env(container: Manifest) -> dict[str, str]:
    """The literal variables a container gets (envFrom first, then env's values)."""
    sources = {"configMapRef": _config(), "secretRef": _secrets()}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ((kind, _),) = source.items()
        env |= sources[kind]
    env |= {v["name"]: v["value"] for v in container.get("env", []) if "value" in v}
    return env


def _selects(selector: dict[str, str], workload: Manifest) -> bool:
    return bool(workload["spec"]["template"]["metadata"]["labels"].items() >= selector.items())


def _statefulsets() -> dict[str, Manifest]:
    return {o["metadata"]["name"]: o for o in _of_kind("StatefulSet")}


def _headless_service(statefulset: Manifest) -> str:
    """Its Service: headless, selecting it, publishing pods before they are ready."""
    name: str = statefulset["spec"]["serviceName"]
    spec = _find("Service", name)["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    assert _selects(spec["selector"], statefulset)
    return name


def _script(config_map: str, key: str) -> str:
    text: str = _find("ConfigMap", config_map)["data"][key]
    return text


# --- the overlay as a whole ----------------------------------------------------------------


def test_kustomization_applies_every_file_namespace_first() -> None:
    kustomization = _kustomization()
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"][0] == "namespace.yaml"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in HA.glob("*.yaml"))
    patches = sorted(entry["path"] for entry in kustomization["patches"])
    assert patches == sorted(str(p.relative_to(HA)) for p in (HA / "patches").glob("*.yaml"))


@pytest.mark.parametrize("name", COPIES)
def test_auras_part_is_deploy_k8s_own(name: str) -> None:
    assert (HA / name).read_text() == (K8S / name).read_text(), (
        f"deploy/k8s/{name} changed: copy it to deploy/k8s/ha/{name} (kustomize cannot "
        "use deploy/k8s as the overlay's base)"
    )


def test_patches_change_only_the_connection_settings() -> None:
    for entry in _kustomization()["patches"]:
        for patch in _load_documents(HA / entry["path"]):
            field = "data" if patch["kind"] == "ConfigMap" else "stringData"
            assert set(patch) == {"apiVersion", "kind", "metadata", field}
            assert set(patch[field]) == PATCHED[patch["kind"]], entry["path"]
    base = {o["kind"]: o for o in _load_documents(K8S / "configmap.yaml")}
    base |= {o["kind"]: o for o in _load_documents(K8S / "secret.yaml")}
    assert set(_config()) == set(base["ConfigMap"]["data"])
    assert set(_secrets()) == set(base["Secret"]["stringData"]) - {"POSTGRES_PASSWORD"}


def test_rendering_matches_kubectl_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the rendering here stands alone")
    built = subprocess.run(
        [kubectl, "kustomize", str(HA)], capture_output=True, text=True, timeout=60, check=True
    )
    rendered = {_key(o): o for o in yaml.safe_load_all(built.stdout) if o}
    assert rendered == {_key(o): o for o in _objects()}


@pytest.mark.parametrize(
    "manifest",
    [o for o in _objects() if o["kind"] != "Cluster"],  # a custom resource: no schema
    ids=lambda o: f"{o['kind']}/{o['metadata']['name']}",
)
def test_manifest_validates_against_kubernetes_schemas(manifest: Manifest) -> None:
    try:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{where or '(top)'}: {exc.message}", pytrace=False)


def test_everything_is_in_the_namespace() -> None:
    assert {_key(o)[2] for o in _objects() if o["kind"] != "Namespace"} == {NAMESPACE}


def test_third_party_images_are_the_official_ones() -> None:
    for name in ("rabbitmq", "redis", "redis-sentinel"):
        for container in _containers(_statefulsets()[name]):
            assert container["image"] == OFFICIAL_IMAGES[name.removesuffix("-sentinel")]


def test_every_container_has_resources() -> None:
    for workload in _statefulsets().values():
        for container in _containers(workload):
            resources = container["resources"]
            assert all(resources[b].keys() >= {"cpu", "memory"} for b in ("requests", "limits"))


# --- RabbitMQ: three nodes, the broker URL lists them all ---------------------------------


def test_broker_url_lists_every_rabbitmq_node() -> None:
    statefulset = _statefulsets()["rabbitmq"]
    service = _find("Service", statefulset["spec"]["serviceName"])
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    urls = [urlsplit(url) for url in broker_urls(_secrets()["CELERY_BROKER_URL"])]
    assert len(urls) == statefulset["spec"]["replicas"] == 3
    for index, url in enumerate(urls):
        pattern = POD_HOST.format(pod=f"rabbitmq-{index}", service=service["metadata"]["name"])
        assert re.fullmatch(pattern, str(url.hostname)), f"node {index}: {url.hostname}"
        (amqp,) = (p for p in service["spec"]["ports"] if p["port"] == url.port)
        assert ports[amqp["targetPort"]] == url.port == 5672
        assert (url.scheme, url.path) == ("amqp", "//")
        env = {v["name"]: v for v in container["env"]}
        assert url.username == env["RABBITMQ_DEFAULT_USER"]["value"]
        assert url.password == _secrets()["RABBITMQ_DEFAULT_PASS"]


def test_rabbitmq_nodes_find_each_other() -> None:
    """Peer discovery builds a node's name from its endpoint's hostname and the suffix;
    it must be the name the node gives itself."""
    statefulset = _statefulsets()["rabbitmq"]
    service_name = _headless_service(statefulset)
    config = dict(
        line.split(" = ", 1)
        for line in _script("rabbitmq-config", "cluster.conf").splitlines()
        if " = " in line and not line.startswith("#")
    )
    assert config["cluster_formation.peer_discovery_backend"] == "rabbit_peer_discovery_k8s"
    assert config["cluster_formation.k8s.service_name"] == service_name
    suffix = f".{service_name}.{NAMESPACE}.svc.cluster.local"
    assert config["cluster_formation.k8s.hostname_suffix"] == suffix
    assert config["cluster_formation.k8s.address_type"] == "hostname"
    assert "rabbitmq_peer_discovery_k8s" in _script("rabbitmq-config", "enabled_plugins")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["RABBITMQ_NODENAME"] == f"rabbit@$(MY_POD_NAME){suffix}"
    assert env["RABBITMQ_USE_LONGNAME"] == "true"


def test_rabbitmq_may_read_its_endpoints() -> None:
    account = _statefulsets()["rabbitmq"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert _find("ServiceAccount", account)
    bindings = [
        b
        for b in _of_kind("RoleBinding")
        if {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in b["subjects"]
    ]
    rules = [r for b in bindings for r in _find("Role", b["roleRef"]["name"])["rules"]]
    assert any("endpoints" in r["resources"] and "get" in r["verbs"] for r in rules)


# --- Redis: three servers, three sentinels, quorum 2 --------------------------------------


def test_redis_url_names_the_sentinels_and_the_master_they_monitor() -> None:
    url = _config()["REDIS_URL"]
    validate_redis_url(url)
    target = parse_sentinel_url(url)  # Aura's own reading of it
    sentinels = _statefulsets()["redis-sentinel"]
    service = _find("Service", sentinels["spec"]["serviceName"])
    assert len(target.sentinels) == sentinels["spec"]["replicas"] == 3
    for index, (host, port) in enumerate(target.sentinels):
        pattern = POD_HOST.format(
            pod=f"redis-sentinel-{index}", service=service["metadata"]["name"]
        )
        assert re.fullmatch(pattern, host), f"sentinel {index}: {host}"
        assert port in {p["port"] for p in service["spec"]["ports"]}
    assert target.db == 0, "the seed's `redis-cli keys retry_count:*` reads db 0"
    (monitor,) = SENTINEL_MONITOR.findall(_script("redis-ha", "sentinel.sh"))
    name, _, port, quorum = monitor
    assert target.service == name
    assert int(quorum) == 2 == len(target.sentinels) // 2 + 1, "a majority of the sentinels"
    redis = _find("Service", _statefulsets()["redis"]["spec"]["serviceName"])
    assert int(port) in {p["port"] for p in redis["spec"]["ports"]}
    for script in ("redis.sh", "pre-stop.sh"):  # the servers ask after the same master
        asked = re.findall(
            r"sentinel (?:get-master-addr-by-name|failover) (\S+)", _script("redis-ha", script)
        )
        assert set(asked) == {name}, f"{script} asks after {asked}"


def test_redis_names_are_the_pods_own() -> None:
    """The scripts name the pods as the StatefulSets and their Services do."""
    for name, script in (("redis", "redis.sh"), ("redis-sentinel", "sentinel.sh")):
        statefulset = _statefulsets()[name]
        service = _headless_service(statefulset)
        assert f'SELF="$(hostname).{service}.$DOMAIN"' in _script("redis-ha", script)
    assert "DOMAIN=aura-platform.svc.cluster.local" in _script("redis-ha", "redis.sh")
    (container,) = _statefulsets()["redis"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "/scripts/redis.sh"]


# --- PostgreSQL: the CloudNativePG Cluster, DATABASE_URL at its -rw Service -----------------


def test_postgres_cluster_shape() -> None:
    cluster = _find("Cluster", "postgres")
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    spec = cluster["spec"]
    assert spec["instances"] >= 3
    synchronous = spec["postgresql"]["synchronous"]
    assert synchronous["method"] in ("any", "first")
    assert 1 <= synchronous["number"] < spec["instances"]
    assert synchronous["dataDurability"] == "required", "zero-loss: never self-heal to async"
    assert not {"minSyncReplicas", "maxSyncReplicas"} & spec.keys(), "the deprecated form"
    assert spec["affinity"]["enablePodAntiAffinity"] is True
    assert spec["affinity"]["podAntiAffinityType"] == "required"
    assert spec["affinity"]["topologyKey"] == "kubernetes.io/hostname"
    assert spec.get("enablePDB", True) is True
    assert spec["storage"]["size"]
    assert spec["imageName"].rsplit(":", 1)[1] == OFFICIAL_IMAGES["postgres"].split(":")[1]


@pytest.mark.parametrize("variable", ["DATABASE_URL", "DLQ_DATABASE_URL"])
def test_database_url_points_at_the_read_write_service(variable: str) -> None:
    initdb = _find("Cluster", "postgres")["spec"]["bootstrap"]["initdb"]
    credentials = _find("Secret", initdb["secret"]["name"])
    assert credentials["type"] == "kubernetes.io/basic-auth"
    url = urlsplit(_secrets()[variable])
    assert url.scheme == "postgresql+asyncpg"
    assert (url.hostname, url.port) == ("postgres-rw", 5432)  # the Cluster's name, -rw
    assert url.path == f"/{initdb['database']}"
    assert url.username == initdb["owner"] == credentials["stringData"]["username"]
    assert url.password == credentials["stringData"]["password"]
    services = {s["metadata"]["name"] for s in _of_kind("Service")}
    assert "postgres" not in services, "the operator makes the Services; the server's is gone"


# --- every stateful set: three pods, one per node, at most one down by choice --------------


@pytest.mark.parametrize("name", ["rabbitmq", "redis", "redis-sentinel"])
def test_stateful_set_has_a_disruption_budget_and_anti_affinity(name: str) -> None:
    statefulset = _statefulsets()[name]
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    budgets = [
        b
        for b in _of_kind("PodDisruptionBudget")
        if _selects(b["spec"]["selector"]["matchLabels"], statefulset)
    ]
    assert [b["spec"].get("maxUnavailable") for b in budgets] == [1]
    affinity = statefulset["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert _selects(term["labelSelector"]["matchLabels"], statefulset)


def test_services_reach_their_pods() -> None:
    for service in _of_kind("Service"):
        spec = service["spec"]
        (workload,) = (
            w
            for w in [*_statefulsets().values(), *_of_kind("Deployment")]
            if _selects(spec["selector"], w)
        )
        ports = {
            p["name"]: p["containerPort"] for c in _containers(workload) for p in c.get("ports", [])
        }
        for port in spec["ports"]:
            assert ports[port["targetPort"]] == port["port"], service["metadata"]["name"]


# --- Aura reads it -------------------------------------------------------------------------


def test_env_names_are_settings_or_third_party() -> None:
    names = set(_config()) | set(_secrets())
    for workload in [*_statefulsets().values(), *_of_kind("Deployment")]:
        names |= {v["name"] for c in _containers(workload) for v in c.get("env", [])}
    unknown = {
        name
        for name in names
        if name not in SETTINGS_VARIABLES and not THIRD_PARTY_VARIABLES.fullmatch(name)
    }
    assert not unknown, f"neither a Settings field nor a third-party image's variable: {unknown}"


@pytest.mark.parametrize("workload", [GATEWAY, WORKER])
def test_app_environment_loads(workload: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (container,) = _find("Deployment", workload)["spec"]["template"]["spec"]["containers"]
    for name, value in _env(container).items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.redis_url == _config()["REDIS_URL"]
    assert settings.celery_broker_url == _secrets()["CELERY_BROKER_URL"]
    assert settings.database_url == _secrets()["DATABASE_URL"]
