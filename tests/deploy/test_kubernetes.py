"""deploy/k8s/ (issue #8): every manifest against the Kubernetes schemas (kubernetes-validate,
offline) or the KEDA schemas in deploy/k8s/schemas/, and consistent with config/ and with each
other.

Regenerate deploy/k8s/configmap.yaml after changing config/ with
``python -m tests.deploy.test_kubernetes``."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import yaml

from tests.deploy.shipped import (
    BROKER_DIR,
    CONFIG_FILES,
    DEFINITIONS,
    DEPLOY,
    HEALTH_PORT,
    K8S,
    WORKER_USER,
    broker_users,
    dockerfile_stages,
)
from tests.support.paths import ROOT

KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every YAML document under deploy/k8s/, by file name."""
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(K8S.glob("*.yaml"))
    }


def resource(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for docs in manifests().values()
        for doc in docs
        if doc["kind"] == kind and name in (None, doc.get("metadata", {}).get("name"))
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


KEDA_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.schema.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication.schema.json",
}


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Problems of one document: KEDA's kinds against deploy/k8s/schemas/, others against Kubernetes'."""
    where = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    schema_file = KEDA_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if schema_file is not None:
        schema = json.loads((K8S / "schemas" / schema_file).read_text())
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
        ]
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where} (Kubernetes {version}): {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    return errors


def test_kubernetes_manifests_are_valid():
    documents = [doc for docs in manifests().values() for doc in docs if doc["kind"] != "Kustomization"]
    kinds = Counter(doc["kind"] for doc in documents)
    assert kinds == {
        "Deployment": 1,
        "ConfigMap": 2,
        "Secret": 4,
        "Job": 1,
        "PodDisruptionBudget": 1,
        "ScaledObject": 1,
        "TriggerAuthentication": 1,
    }
    assert [error for doc in documents for error in schema_errors(doc)] == []


def test_schema_check_catches_misspelt_fields():
    deployment = resource("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    misspelt = {**container, "livenesProbe": container["livenessProbe"]}
    broken = {
        **deployment,
        "spec": {
            **deployment["spec"],
            "template": {
                **deployment["spec"]["template"],
                "spec": {**deployment["spec"]["template"]["spec"], "containers": [misspelt]},
            },
        },
    }
    assert any("livenesProbe" in error for error in schema_errors(broken))
    scaled = resource("ScaledObject")
    assert schema_errors({**scaled, "spec": {**scaled["spec"], "maxReplicas": 3}}) != []


def test_scale_down_behaviour_is_a_valid_hpa_behaviour():
    """KEDA hands ``advanced.horizontalPodAutoscalerConfig.behavior`` to the HPA it creates."""
    scaled = resource("ScaledObject")
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-llm-worker"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-worker"},
            "maxReplicas": scaled["spec"]["maxReplicaCount"],
            "behavior": scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        },
    }
    assert schema_errors(hpa) == []


def test_kustomization_applies_every_manifest_but_the_secret_template():
    kustomization = resource("Kustomization")
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"secret.template.yaml"}
    assert {doc["kind"] for doc in manifests()["secret.template.yaml"]} == {"Secret"}


def test_secret_template_holds_placeholders_only():
    for secret in manifests()["secret.template.yaml"]:
        for key, value in secret["stringData"].items():
            if "://" in value:
                assert urlsplit(value).password in (None, "CHANGE-ME"), key
            elif key.endswith("_KEY") or key == "password" or secret["metadata"]["name"] == USERS_SECRET:
                assert value == "CHANGE-ME", key


def container() -> dict[str, Any]:
    [worker] = resource("Deployment")["spec"]["template"]["spec"]["containers"]
    return worker


def test_deployment_outlasts_the_drain_and_the_longest_request(settings):
    pod = resource("Deployment")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > settings.bus.drain_timeout_s, "SIGKILL would cut the drain short"
    assert grace > settings.llm.deadline_s, "SIGKILL could land inside a request's deadline"


def test_deployment_leaves_the_replica_count_to_keda():
    deployment = resource("Deployment")
    assert "replicas" not in deployment["spec"], "`kubectl apply` would reset KEDA's replica count"
    assert resource("ScaledObject")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_deployment_runs_as_the_images_unprivileged_user():
    pod = resource("Deployment")["spec"]["template"]["spec"]
    final = dockerfile_stages(DEPLOY / "Dockerfile")[-1]
    [user] = [args for keyword, args in final if keyword == "USER"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False


def test_deployment_probes_the_health_endpoints_and_sets_resources():
    worker = container()
    [port] = worker["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", HEALTH_PORT)
    for probe, path in (
        ("startupProbe", "/livez"),
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/readyz"),
    ):
        assert worker[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe
    annotations = resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(HEALTH_PORT)
    resources = worker["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"], f"requests.{kind}"
    assert "memory" in resources["limits"]


def test_deployment_reads_config_from_the_configmap_and_keys_from_the_secret(secret_names):
    worker = container()
    env = {item["name"]: item for item in worker["env"]}
    [config_mount] = [m for m in worker["volumeMounts"] if m["name"] == "config"]
    assert env["WORKER_CONFIG_DIR"]["value"] == config_mount["mountPath"]
    volumes = {v["name"]: v for v in resource("Deployment")["spec"]["template"]["spec"]["volumes"]}
    configmap = resource("ConfigMap", "llm-worker-config")
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert {item["path"] for item in volumes["config"]["configMap"]["items"]} == set(CONFIG_FILES)

    from_secret = {
        name: item["valueFrom"]["secretKeyRef"] for name, item in env.items() if "valueFrom" in item
    }
    assert set(from_secret) == secret_names | {"AMQP_URL", "REDIS_URL"}
    secret = resource("Secret", "llm-worker-secrets")
    for name, ref in from_secret.items():
        assert ref["name"] == "llm-worker-secrets" and ref["key"] == name
    assert set(secret["stringData"]) == set(from_secret), "the template lists every key the worker reads"


def configmap_text() -> str:
    """deploy/k8s/configmap.yaml as generated from config/ (data = the files, byte for byte)."""
    lines = [
        "# Generated from config/llm.yaml, bus.yaml, redis.yaml and callers.yaml: edit those, then run",
        "#   .venv/bin/python -m tests.deploy.test_kubernetes",
        "# (or kubectl create configmap llm-worker-config --from-file=config/llm.yaml",
        "#  --from-file=config/bus.yaml --from-file=config/redis.yaml --from-file=config/callers.yaml",
        "#  --dry-run=client -o yaml),",
        "# apply, and `kubectl rollout restart deployment/llm-worker`: workers read it at start-up.",
        "# AMQP_URL and REDIS_URL from the Secret override the URLs in these files.",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: llm-worker-config",
        "  labels:",
        "    app.kubernetes.io/name: llm-worker",
        "data:",
    ]
    for name in CONFIG_FILES:
        text = (ROOT / "config" / name).read_text()
        assert text.endswith("\n") and not text.endswith("\n\n"), f"config/{name}: end with one newline"
        lines.append(f"  {name}: |")
        lines += [f"    {line}" if line else "" for line in text.splitlines()]
    rendered = "\n".join(lines) + "\n"
    data = yaml.safe_load(rendered)["data"]
    assert all(data[name] == (ROOT / "config" / name).read_text() for name in CONFIG_FILES)
    return rendered


def test_configmap_carries_config_files_unchanged():
    data = resource("ConfigMap", "llm-worker-config")["data"]
    stale = [name for name in CONFIG_FILES if data.get(name) != (ROOT / "config" / name).read_text()]
    assert not stale, (
        f"deploy/k8s/configmap.yaml is stale for {stale}: run `python -m tests.deploy.test_kubernetes`"
    )
    assert (K8S / "configmap.yaml").read_text() == configmap_text()


BROKER_CONFIGMAP = "llm-worker-broker"
BROKER_FILES = ("definitions.json", "import_definitions.py")  # from deploy/rabbitmq/
USERS_SECRET = "llm-worker-rabbitmq-users"


def broker_configmap_text() -> str:
    """deploy/k8s/broker-configmap.yaml as generated from deploy/rabbitmq/ (byte for byte)."""
    lines = [
        "# Generated from deploy/rabbitmq/definitions.json and import_definitions.py: edit those, then run",
        "#   .venv/bin/python -m tests.deploy.test_kubernetes",
        "# What broker-job.yaml imports into the broker (docs/deploy.md). No password is in it.",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        f"  name: {BROKER_CONFIGMAP}",
        "  labels:",
        "    app.kubernetes.io/name: llm-worker",
        "data:",
    ]
    for name in BROKER_FILES:
        lines.append(f"  {name}: |")
        lines += [f"    {line}" if line else "" for line in (BROKER_DIR / name).read_text().splitlines()]
    rendered = "\n".join(lines) + "\n"
    data = yaml.safe_load(rendered)["data"]
    assert all(data[name] == (BROKER_DIR / name).read_text() for name in BROKER_FILES)
    return rendered


def test_broker_configmap_carries_the_shipped_definitions_unchanged():
    data = resource("ConfigMap", BROKER_CONFIGMAP)["data"]
    assert data["definitions.json"] == DEFINITIONS.read_text(), (
        "deploy/k8s/broker-configmap.yaml is stale: run `python -m tests.deploy.test_kubernetes`"
    )
    assert (K8S / "broker-configmap.yaml").read_text() == broker_configmap_text()


def job_container() -> dict[str, Any]:
    [job] = resource("Job", "llm-worker-broker-definitions")["spec"]["template"]["spec"]["containers"]
    return job


def mounted(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume that a path inside the container lies on, and the path inside that volume."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return volumes[mount["name"]], path[len(mount["mountPath"]) :].strip("/")
    raise AssertionError(f"{path} is on no volume")


def test_the_job_imports_the_shipped_definitions_with_a_password_per_user():
    """What test_broker_import.py runs against a broker: the script and definitions of the
    ConfigMap, a password file per user from the users Secret, an administrator's login."""
    job = job_container()
    pod = resource("Job", "llm-worker-broker-definitions")["spec"]["template"]["spec"]
    python, script, definitions, passwords = job["command"]
    assert python == "python" and job["image"] == container()["image"], "the worker's image runs it"
    for path, key in ((script, "import_definitions.py"), (definitions, "definitions.json")):
        volume, inside = mounted(pod, job, path)
        assert (volume["configMap"]["name"], inside) == (BROKER_CONFIGMAP, key)
    volume, inside = mounted(pod, job, passwords + "/x")
    assert (volume["secret"]["secretName"], inside) == (USERS_SECRET, "x") and "items" not in volume["secret"]
    users = resource("Secret", USERS_SECRET)["stringData"]
    assert sorted(users) == sorted(broker_users()), "the template lists a password for every user"
    env = {item["name"]: item for item in job["env"]}
    admin = resource("Secret", "llm-worker-rabbitmq-admin")["stringData"]
    for name in ("RABBITMQ_MANAGEMENT_URL", "RABBITMQ_ADMIN_USERNAME"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "llm-worker-rabbitmq-admin" and ref["key"] in admin
    volume, inside = mounted(pod, job, env["RABBITMQ_ADMIN_PASSWORD_FILE"]["value"])
    assert volume["secret"]["secretName"] == "llm-worker-rabbitmq-admin" and inside == "password"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert job["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_worker_reads_only_its_own_broker_password_from_the_users_secret():
    pod = resource("Deployment")["spec"]["template"]["spec"]
    env = {item["name"]: item for item in container()["env"]}
    volume, inside = mounted(pod, container(), env["AMQP_PASSWORD_FILE"]["value"])
    assert volume["secret"]["secretName"] == USERS_SECRET and inside == WORKER_USER
    assert volume["secret"]["items"] == [{"key": WORKER_USER, "path": WORKER_USER}], (
        "not the agents' passwords"
    )
    amqp = urlsplit(resource("Secret", "llm-worker-secrets")["stringData"]["AMQP_URL"])
    assert (amqp.username, amqp.password) == (WORKER_USER, None), "one password, one source"


def test_keda_scales_on_ready_and_unacked_messages_of_the_request_queue(settings):
    spec = resource("ScaledObject")["spec"]
    [trigger] = spec["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    assert metadata["protocol"] == "http", "only the management API counts unacked messages"
    assert metadata["mode"] == "QueueLength"
    assert metadata["queueName"] == settings.bus.request_queue
    assert int(metadata["value"]) == settings.bus.prefetch, "one replica per prefetch-full of messages"
    assert metadata.get("excludeUnacknowledged", "false") == "false"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], (
        "maxReplicaCount set (KEDA's default is 100)"
    )


def test_keda_authenticates_from_its_own_secret():
    trigger_auth = resource("TriggerAuthentication")
    [trigger] = resource("ScaledObject")["spec"]["triggers"]
    assert trigger["authenticationRef"]["name"] == trigger_auth["metadata"]["name"]
    refs = trigger_auth["spec"]["secretTargetRef"]
    assert {ref["parameter"] for ref in refs} == {"host", "username", "password"}
    for ref in refs:
        assert ref["key"] in resource("Secret", ref["name"])["stringData"]
    worker_secrets = {
        item["valueFrom"]["secretKeyRef"]["name"] for item in container()["env"] if "valueFrom" in item
    }
    assert {ref["name"] for ref in refs}.isdisjoint(worker_secrets), "the worker never sees KEDA's login"


def test_disruption_budget_selects_the_worker_pods():
    pdb = resource("PodDisruptionBudget")
    deployment = resource("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


if __name__ == "__main__":
    (K8S / "configmap.yaml").write_text(configmap_text())
    (K8S / "broker-configmap.yaml").write_text(broker_configmap_text())
    print(f"wrote {K8S / 'configmap.yaml'} and {K8S / 'broker-configmap.yaml'}")
