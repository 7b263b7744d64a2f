"""Static checks of the deployment files under deploy/.

Fast and offline. External linters run only when installed: promtool (Debian
package `prometheus`) and `docker compose`; their tests skip otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "twinq.json"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "kubernetes"

# The metric contract that dashboards and alerts are written against. The test below checks it
# is exactly what the code exports (worker via prometheus_client, index build via the
# Pushgateway), so a renamed metric fails here rather than on a blank dashboard.
EXPORTED_METRICS = frozenset(
    {
        # worker
        "twinq_requests_total",
        "twinq_stage_latency_seconds",
        "twinq_batch_size",
        "twinq_stream_length",
        "twinq_consumer_group_lag",
        "twinq_pending_entries",
        "twinq_dead_letters_total",
        "twinq_snapshot_info",
        "twinq_snapshot_age_seconds",
        "twinq_indexed_rows",
        "twinq_model_load_seconds",
        "twinq_reloads_total",
        "twinq_query_cache_total",
        "twinq_worker_up",
        "twinq_snapshot_store_up",
        "twinq_live_rows",
        "twinq_update_lag_seconds",
        "twinq_served_watermark_timestamp_seconds",
        "twinq_updates_total",
        "twinq_rerank_pairs_total",
        # index build (Pushgateway, job="twinq_index_build")
        "twinq_build_rows",
        "twinq_build_stage_seconds",
        "twinq_build_last_success_timestamp_seconds",
        "twinq_build_last_failure_timestamp_seconds",
        "twinq_build_success",
    }
)
HISTOGRAMS = frozenset({"twinq_stage_latency_seconds", "twinq_batch_size"})
# Labels of each metric and, where the contract fixes them, their values
# (None: free-form value).
METRIC_LABELS: dict[str, dict[str, frozenset[str] | None]] = {
    "twinq_requests_total": {
        "outcome": frozenset(
            {"ok", "bad_request", "too_large", "overloaded", "not_ready", "internal", "duplicate", "no_twin"}
        )
    },
    "twinq_stage_latency_seconds": {"stage": frozenset({"queue", "embed", "search", "rerank", "total"})},
    "twinq_snapshot_info": {"version": None},
    "twinq_model_load_seconds": {"model": frozenset({"bi_encoder", "cross_encoder"})},
    "twinq_reloads_total": {"result": frozenset({"success", "failure"})},
    "twinq_query_cache_total": {"result": frozenset({"hit", "miss"})},
    "twinq_updates_total": {"outcome": frozenset({"upsert", "delete", "refused"})},
    "twinq_build_rows": {"kind": frozenset({"read", "rejected", "embedded", "reused", "indexed"})},
    "twinq_build_stage_seconds": {"stage": frozenset({"read", "embed", "write", "validate", "publish", "total"})},
}
TARGET_LABELS = frozenset({"job", "instance"})  # added by Prometheus / Pushgateway
# `up` is Prometheus' own per-target health series.
PROMETHEUS_SERIES = frozenset({"up"})

REQUIRED_ALERTS = frozenset(
    {
        "TwinqBacklogHigh",
        "TwinqBacklogGrowing",
        "TwinqHighLatencyP95",
        "TwinqDeadLetters",
        "TwinqSnapshotStale",
        "TwinqWorkerDown",
        "TwinqIndexBuildFailed",
        "TwinqIndexBuildStale",
    }
)
GRAFANA_DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:$])(twinq_[a-z0-9_]+|up)(?![A-Za-z0-9_:])")
_SELECTOR = re.compile(r"(twinq_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


# ---------------------------------------------------------------- helpers


def _files(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in DEPLOY.rglob(pattern) if p.is_file())


def _load_yaml_docs(path: Path) -> list:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def _load_yaml(path: Path):
    docs = _load_yaml_docs(path)
    assert len(docs) == 1, f"{path} should hold one YAML document"
    return docs[0]


def _alert_rules() -> list[dict]:
    groups = _load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _dashboard_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_dashboard_panels(panel.get("panels", [])))  # collapsed rows
    return out


def _dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in _dashboard_panels(_dashboard()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def _base_metric(name: str) -> str:
    """Map a series name to its contract metric (histogram suffixes stripped)."""
    match = re.fullmatch(r"(.+)_(bucket|sum|count)", name)
    if match and match.group(1) in HISTOGRAMS:
        return match.group(1)
    return name


def metric_names(expr: str) -> set[str]:
    """Metric-looking identifiers of a PromQL expression, string literals removed."""
    return set(_IDENTIFIER.findall(_STRING_LITERAL.sub('""', expr)))


def promql_problems(expr: str) -> list[str]:
    """Metric and label names (and fixed label values) not in the contract."""
    problems = []
    for name in sorted(metric_names(expr)):
        if name in PROMETHEUS_SERIES:
            continue
        base = _base_metric(name)
        if base not in EXPORTED_METRICS:
            problems.append(f"unknown metric {name!r}")
        elif name.endswith("_total") and base in HISTOGRAMS:
            problems.append(f"histogram {base!r} has no _total series")
    for name, body in _SELECTOR.findall(expr):
        base = _base_metric(name)
        allowed = METRIC_LABELS.get(base, {})
        for label, op, value in _MATCHER.findall(body):
            if label in TARGET_LABELS or (label == "le" and name.endswith("_bucket")):
                continue
            if label not in allowed:
                problems.append(f"{name} has no label {label!r}")
                continue
            values = allowed[label]
            if values is None:
                continue
            if op in ("=", "!="):
                wanted = [value]
            elif re.fullmatch(r"[a-z_]+(\|[a-z_]+)*", value):
                wanted = value.split("|")
            else:
                continue  # a real regex: not checked
            problems.extend(f"{name}{{{label}}} has no value {v!r}" for v in wanted if v not in values)
    known_labels = {label for labels in METRIC_LABELS.values() for label in labels} | TARGET_LABELS | {"le"}
    for group in _GROUPING.findall(_STRING_LITERAL.sub('""', expr)):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in known_labels:
                problems.append(f"grouping by unknown label {label!r}")
    return problems


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def _parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """systemd unit as {section: [(key, value), ...]} (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    logical: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not logical and (not raw.strip() or raw.lstrip().startswith(("#", ";"))):
            continue
        if raw.endswith("\\"):
            logical.append(raw[:-1])
            continue
        line = " ".join(part.strip() for part in [*logical, raw])
        logical = []
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None, f"{path}: entry outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {line}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def _unit_values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


# ---------------------------------------------------------------- syntax


def test_deploy_tree_has_expected_files():
    expected = [
        "README.md",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "grafana/dashboards/twinq.json",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/twinq.yml",
        "docker/Dockerfile",
        "docker-compose.yml",
        "kubernetes/worker-deployment.yaml",
        "kubernetes/worker-scaledobject.yaml",
        "kubernetes/index-cronjob.yaml",
        "kubernetes/pvc.yaml",
        "kubernetes/storage-config.yaml",
        "kubernetes/kustomization.yaml",
        "systemd/twinq-worker.service",
        "systemd/twinq-reindex.service",
        "systemd/twinq-reindex.timer",
        "cron/twinq-reindex.cron",
        "runners/flink.md",
        "runners/spark.md",
        "runners/dataflow.md",
        "runners/requirements-beam-workers.txt",
    ]
    missing = [name for name in expected if not (DEPLOY / name).is_file()]
    assert not missing, f"missing deploy files: {missing}"


@pytest.mark.parametrize("path", _files("*.yml", "*.yaml"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    assert _load_yaml_docs(path), f"{path} holds no YAML document"


@pytest.mark.parametrize("path", _files("*.json"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path):
    json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- PromQL vs. the metric contract


def test_promql_checker_catches_mistakes():
    # Guard the checker itself, so that a green run means something.
    assert promql_problems('sum by (le) (rate(twinq_stage_latency_seconds_bucket{stage="total"}[5m]))') == []
    assert promql_problems('up{job="twinq_worker"} == 0 or absent(twinq_worker_up)') == []
    assert promql_problems("rate(twinq_requests[5m])")  # missing _total
    assert promql_problems("twinq_requests_total_bucket")  # not a histogram
    assert promql_problems('twinq_requests_total{outcome="error"}')  # unknown value
    assert promql_problems('twinq_requests_total{outcome=~"ok|oops"}')
    assert promql_problems('twinq_build_rows{stage="read"}')  # wrong label
    assert promql_problems("sum by (status) (twinq_requests_total)")
    assert metric_names('twinq_build_success{job="twinq_index_build"}') == {"twinq_build_success"}


def test_alert_exprs_use_only_exported_metrics():
    problems = {rule["alert"]: promql_problems(rule["expr"]) for rule in _alert_rules()}
    assert not {k: v for k, v in problems.items() if v}


def test_dashboard_exprs_use_only_exported_metrics():
    exprs = _dashboard_exprs()
    assert exprs, "dashboard has no queries"
    problems = {expr: promql_problems(expr) for expr in exprs}
    assert not {k: v for k, v in problems.items() if v}


def test_dashboard_covers_every_exported_metric():
    used = {_base_metric(name) for expr in _dashboard_exprs() for name in metric_names(expr)}
    assert not EXPORTED_METRICS - used, f"metrics without a panel: {sorted(EXPORTED_METRICS - used)}"


# ---------------------------------------------------------------- alert rules


def test_required_alerts_exist():
    names = [rule["alert"] for rule in _alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert not REQUIRED_ALERTS - set(names), f"missing alerts: {sorted(REQUIRED_ALERTS - set(names))}"


def test_alerts_have_severity_annotations_and_runbook():
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,4} (\w+)\s*$", readme, flags=re.MULTILINE))
    for rule in _alert_rules():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert str(annotations.get(key, "")).strip(), f"{name}: missing annotation {key}"
        assert f"deploy/README.md#{name.lower()}" in annotations["runbook"], name
        assert name in headings, f"README.md has no runbook heading for {name}"


def test_alert_thresholds_match_contract():
    rules = {rule["alert"]: rule for rule in _alert_rules()}
    assert "129600" in rules["TwinqSnapshotStale"]["expr"]  # 36h
    assert "129600" in rules["TwinqIndexBuildStale"]["expr"]
    assert "twinq_build_success == 0" in rules["TwinqIndexBuildFailed"]["expr"]
    assert "absent(twinq_worker_up)" in rules["TwinqWorkerDown"]["expr"]
    assert "histogram_quantile(0.95" in rules["TwinqHighLatencyP95"]["expr"]
    assert "increase(twinq_dead_letters_total" in rules["TwinqDeadLetters"]["expr"]


def test_prometheus_config_references_rules_and_targets():
    config = _load_yaml(PROM_CONFIG)
    for rule_file in config["rule_files"]:
        assert (PROM_CONFIG.parent / rule_file).is_file(), rule_file
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker_targets = [t for sc in jobs["twinq_worker"]["static_configs"] for t in sc["targets"]]
    assert "worker:9108" in worker_targets
    assert jobs["pushgateway"]["honor_labels"] is True


# ---------------------------------------------------------------- promtool (optional)

_PROMTOOL = shutil.which("promtool")
_NO_PROMTOOL = "promtool not on PATH (install Debian package 'prometheus' to run this check)"


def test_promtool_check_rules():
    if not _PROMTOOL:
        pytest.skip(_NO_PROMTOOL)
    result = _run([_PROMTOOL, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config():
    if not _PROMTOOL:
        pytest.skip(_NO_PROMTOOL)
    result = _run([_PROMTOOL, "check", "config", str(PROM_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests():
    if not _PROMTOOL:
        pytest.skip(_NO_PROMTOOL)
    result = _run([_PROMTOOL, "test", "rules", str(ALERTS_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- Grafana


def test_dashboard_metadata_and_datasources():
    dashboard = _dashboard()
    assert dashboard["uid"] == "twinq"
    assert dashboard["schemaVersion"] == 39
    assert "${DS_" not in DASHBOARD.read_text(encoding="utf-8")
    panels = _dashboard_panels(dashboard["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == GRAFANA_DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == GRAFANA_DATASOURCE, panel["title"]
    titles = " | ".join(panel["title"].lower() for panel in panels)
    for topic in ("outcome", "latency", "lag", "dead letters", "snapshot age", "version",
                  "indexed rows", "kind", "stage", "reload", "cache hit"):
        assert topic in titles, f"no panel about {topic!r}"


def test_grafana_provisioning_matches_dashboard():
    datasources = _load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert any(ds["uid"] == GRAFANA_DATASOURCE["uid"] and ds["type"] == "prometheus" for ds in datasources)
    providers = _load_yaml(DEPLOY / "grafana/provisioning/dashboards/twinq.yml")["providers"]
    paths = {provider["options"]["path"] for provider in providers}
    grafana = _load_yaml(COMPOSE)["services"]["grafana"]
    mounted = {v.split(":")[1] for v in grafana["volumes"] if v.startswith("./grafana/dashboards")}
    assert paths & mounted, f"provisioned path {paths} is not where compose mounts the dashboards {mounted}"


# ---------------------------------------------------------------- Docker


def test_dockerfile_basics():
    text = (DEPLOY / "docker/Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, flags=re.MULTILINE)
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"pip install[^\n]*/src|pip install \.", text)
    assert 'ENTRYPOINT ["twinq"]' in text
    assert "HF_HUB_OFFLINE=1" in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "image must run as non-root"


SNAPSHOT_ROOT = "s3://twinq/snapshots"
CACHE_DIR = "/var/cache/twinq"
AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def test_compose_structure():
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert {"redis", "s3", "s3-init", "worker", "indexer", "prometheus", "pushgateway",
            "grafana"} <= set(services)
    assert services["redis"]["image"].startswith("redis:7")
    assert "--appendonly" in services["redis"]["command"]
    worker_cmd = " ".join(services["worker"]["command"])
    assert worker_cmd == (
        f"worker --root {SNAPSHOT_ROOT} --cache-dir {CACHE_DIR} --redis-url redis://redis:6379/0 "
        "--metrics-port 9108 --metrics-host 0.0.0.0"
    )
    indexer = services["indexer"]
    assert indexer["profiles"] == ["batch"]
    indexer_cmd = " ".join(indexer["command"])
    assert indexer_cmd.startswith(f"index build --corpus /data/corpus/*.jsonl --root {SNAPSHOT_ROOT} --publish")
    for name in ("worker", "indexer"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(("./", "../")):
                assert (COMPOSE.parent / source).exists(), f"{name}: bind source {source} missing"
            elif not source.startswith(("$", "/")):
                assert source in declared, f"{name}: volume {source} not declared"
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert prom_mounts.get("/etc/prometheus") == "./prometheus"


def _compose_mount(volume: str) -> tuple[str, str]:
    """(source, target) of a short-syntax compose volume; the source may hold `${X:-y}`."""
    body = re.sub(r":(ro|rw)$", "", volume)
    source, _, target = body.rpartition(":")
    return source, target


def test_compose_snapshots_on_object_storage():
    """Snapshots go through the `s3` service, not a shared volume; each worker caches locally."""
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    s3 = services["s3"]
    assert s3["image"].startswith(("chrislusf/seaweedfs:", "minio/minio:"))
    assert "healthcheck" in s3
    s3_command = " ".join(s3.get("entrypoint", []) + s3.get("command", []))
    assert "-s3" in s3_command and "-s3.port=8333" in s3_command
    bucket = SNAPSHOT_ROOT.removeprefix("s3://").split("/")[0]
    init = services["s3-init"]
    assert bucket in " ".join(init["command"]), "the init step must create the root's bucket"
    assert init["depends_on"]["s3"]["condition"] == "service_healthy"
    for name in ("worker", "indexer", "s3-init"):
        env = services[name]["environment"]
        missing = [key for key in AWS_ENV if not env.get(key)]
        assert not missing, f"{name}: missing {missing}"
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333", name
    for name in ("worker", "indexer"):
        depends = services[name]["depends_on"]
        assert depends["s3-init"]["condition"] == "service_completed_successfully", name
        targets = [_compose_mount(v)[1] for v in services[name].get("volumes", [])]
        assert not any(t == "/data" or t.startswith("/data/twinq") for t in targets), (
            f"{name}: snapshots must not come from a volume")
    worker_mounts = {target: source for source, target in map(_compose_mount, services["worker"]["volumes"])}
    assert worker_mounts.get(CACHE_DIR) in set(compose["volumes"]), "worker cache on a named local volume"
    assert "twinq-data" not in set(compose["volumes"])


def test_docker_compose_config():
    try:
        probe = _run(["docker", "compose", "version"])
    except (FileNotFoundError, subprocess.TimeoutExpired):
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("`docker compose` is not available")
    result = _run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- Kubernetes


def _k8s(kind: str) -> dict:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _load_yaml_docs(path):
            if doc.get("kind") == kind:
                return doc
    raise AssertionError(f"no {kind} under {K8S}")


def test_kustomization_lists_existing_resources():
    kustomization = _load_yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource


def test_cronjob_forbids_concurrency_and_publishes():
    cronjob = _k8s("CronJob")["spec"]
    assert cronjob["concurrencyPolicy"] == "Forbid"
    assert cronjob["schedule"] == "30 2 * * *"
    container = cronjob["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert "twinq index build" in script and "--publish" in script
    assert "twinq index gc" in script and "--keep 3" in script


def test_worker_deployment_probes_and_grace():
    spec = _k8s("Deployment")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 30
    container = spec["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path
        assert ports.get(http["port"], http["port"]) == 9108
    env = {item["name"]: item for item in container["env"]}
    assert "secretKeyRef" in env["TWINQ_REDIS_URL"]["valueFrom"]
    assert "TWINQ_THREADS" in env


def _env_from(container: dict) -> tuple[set[str], set[str]]:
    """(ConfigMap names, Secret names) a container takes whole (envFrom)."""
    sources = container.get("envFrom", [])
    return ({s["configMapRef"]["name"] for s in sources if "configMapRef" in s},
            {s["secretRef"]["name"] for s in sources if "secretRef" in s})


def _storage_env(container: dict) -> None:
    """The AWS endpoint from the storage ConfigMap, the keys from a Secret (never inline)."""
    config_maps, secrets = _env_from(container)
    (config_map,) = [doc for path in sorted(K8S.glob("*.yaml")) for doc in _load_yaml_docs(path)
                     if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] in config_maps]
    assert config_map["data"].get("AWS_ENDPOINT_URL", "").startswith("http")
    assert "AWS_DEFAULT_REGION" in config_map["data"]
    assert secrets, "AWS credentials must come from a Secret (envFrom secretRef)"
    inline = {item["name"] for item in container.get("env", [])}
    assert not inline & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, "credentials inline"


def test_worker_reads_snapshots_from_object_storage_into_an_emptydir_cache():
    spec = _k8s("Deployment")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    args = [str(arg) for arg in container["args"]]
    assert args[args.index("--root") + 1] == SNAPSHOT_ROOT
    cache_dir = args[args.index("--cache-dir") + 1]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert not any("persistentVolumeClaim" in v for v in volumes.values()), "workers need no shared volume"
    (cache_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == cache_dir]
    assert "emptyDir" in volumes[cache_mount["name"]]
    assert not cache_mount.get("readOnly")
    _storage_env(container)


def test_index_cronjob_writes_to_object_storage():
    template = _k8s("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = template["containers"][0]
    env = {item["name"]: item.get("value") for item in container.get("env", [])}
    script = " ".join(container.get("command", []) + container.get("args", []))
    script = script.replace('"$TWINQ_ROOT"', str(env.get("TWINQ_ROOT")))
    assert script.count(f"--root {SNAPSHOT_ROOT}") == 2, "build and gc on the worker's root"
    _storage_env(container)
    claims = [v["persistentVolumeClaim"]["claimName"] for v in template["volumes"]
              if "persistentVolumeClaim" in v]
    pvc_names = {doc["metadata"]["name"] for doc in _load_yaml_docs(K8S / "pvc.yaml")}
    assert set(claims) <= pvc_names


def test_scaledobject_redis_streams_trigger():
    scaled = _k8s("ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == _k8s("Deployment")["metadata"]["name"]
    (trigger,) = [t for t in scaled["triggers"] if t["type"] == "redis-streams"]
    meta = trigger["metadata"]
    assert meta["stream"] == "twinq:queries"
    assert meta["consumerGroup"] == "twinq-workers"
    assert meta["pendingEntriesCount"] == "50"  # KEDA metadata values are strings


# ---------------------------------------------------------------- systemd / cron


def test_systemd_units():
    timer = _parse_unit(DEPLOY / "systemd/twinq-reindex.timer")
    assert _unit_values(timer, "Timer", "OnCalendar") == ["*-*-* 02:30:00"]
    assert _unit_values(timer, "Timer", "Persistent") == ["true"]
    reindex = _parse_unit(DEPLOY / "systemd/twinq-reindex.service")
    assert _unit_values(reindex, "Service", "Type") == ["oneshot"]
    starts = _unit_values(reindex, "Service", "ExecStart")
    assert "index build" in starts[0] and "--publish" in starts[0]
    assert "index gc" in starts[-1] and "--keep 3" in starts[-1]
    worker = _parse_unit(DEPLOY / "systemd/twinq-worker.service")
    (exec_start,) = _unit_values(worker, "Service", "ExecStart")
    assert " worker " in exec_start and "--metrics-port 9108" in exec_start
    (stop_timeout,) = _unit_values(worker, "Service", "TimeoutStopSec")
    assert int(stop_timeout) >= 30, "must cover the worker's 30s shutdown grace"


def test_cron_line_uses_flock():
    lines = [
        line
        for line in (DEPLOY / "cron/twinq-reindex.cron").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not re.match(r"^[A-Z_]+=", line)
    ]
    assert len(lines) == 1, lines
    fields = lines[0].split(None, 6)
    assert fields[:5] == ["30", "2", "*", "*", "*"]
    command = fields[6]
    assert "%" not in command, "unescaped % is a newline in crontab"
    assert "flock -n" in command and "twinq index build" in command and "--publish" in command


# ---------------------------------------------------------------- Beam runner recipes


def test_runner_recipes_and_requirements():
    for name, flags in {
        "flink.md": ("--runner FlinkRunner", "--flink_master", "--environment_type"),
        "spark.md": ("--runner SparkRunner", "--spark_master_url"),
        "dataflow.md": ("--runner DataflowRunner", "--project", "--region", "--temp_location",
                        "--requirements_file", "--setup_file", "--sdk_container_image", "--extra_package"),
    }.items():
        text = (DEPLOY / "runners" / name).read_text(encoding="utf-8")
        missing = [flag for flag in flags if flag not in text]
        assert not missing, f"{name} lacks {missing}"
    requirements = [
        line.split("#")[0].strip()
        for line in (DEPLOY / "runners/requirements-beam-workers.txt").read_text(encoding="utf-8").splitlines()
    ]
    requirements = [line for line in requirements if line]
    assert requirements
    for line in requirements:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[a-z0-9,_-]+\])?==[0-9][A-Za-z0-9.+]*", line), line
    assert not any(line.lower().startswith(("apache-beam", "apache_beam")) for line in requirements), (
        "the worker SDK comes from the container image and must equal the launcher's"
    )


def test_metric_contract_matches_what_the_code_exports() -> None:
    from twinq.pipelines.build_metrics import BUILD_METRICS, build_registry
    from twinq.worker.metrics import EXPORTED_METRICS as WORKER_METRICS

    assert EXPORTED_METRICS == WORKER_METRICS | BUILD_METRICS
    manifest = {"corpus": {"rows_read": 3, "rows_rejected": 1, "rows_embedded": 2, "rows_reused": 0,
                           "rows_indexed": 2},
                "build": {"stages_s": {"pipeline": 1.5, "validate": 0.1, "total": 1.7}}}
    for registry, expected in ((build_registry(manifest), BUILD_METRICS - {
            "twinq_build_last_failure_timestamp_seconds"}),
            (build_registry(None), {"twinq_build_success",
                                    "twinq_build_last_failure_timestamp_seconds"})):
        names = {metric.name for metric in registry.collect()}
        assert names == expected
