"""The Helm charts render, lint, validate against Kubernetes schemas, and keep their promises.

What is checked, exactly:
- ``helm lint`` and ``helm template`` through Helm's own Go SDK (helm-python-sdk, Helm v4.2.3),
  for the default values and for variants (GPU on, metrics off, persistence off, a PVC for data).
- Every rendered document parses as YAML with duplicate keys rejected, and every built-in kind
  validates against the Kubernetes 1.30 *strict* OpenAPI schemas shipped by kubernetes-validate
  (unknown fields fail). The ServiceMonitor is a CRD and has no schema there: its structure is
  checked by assertions below.
- ``values.schema.json`` is a valid draft-07 schema, the default values satisfy it, and Helm
  refuses values that break the chart's rules.
- The server.toml / client.toml the charts render are accepted by fedseal's own config loaders;
  the site chart renders a trust anchor ([trust] roster + pinned authority key and/or [peers]) and
  [privacy], and refuses to render without a trust anchor.
- Security properties: non-root, read-only root filesystem, no privilege escalation, only
  9092/9095 on the public Service, metrics only to the monitoring namespace, site egress only to
  the coordinator.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.deploytools import DEPLOY, load_all_strict

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk not installed; CI needs: pip install -r deploy/requirements-lint.txt"
)

COORD = DEPLOY / "helm" / "fedseal-coordinator"
SITE = DEPLOY / "helm" / "fedseal-site"
K8S_VERSION = "1.30.0"
ROOT_HEX = "0f" * 32
KID_B, KID_C = "ab" * 32, "CD" * 32
TRUST_ROSTER = {"rosterConfigMap": "fedseal-consortium"}
SITE_MIN = {"data": {"hostPath": "/srv/fedseal-data"}, "approvedRoot": ROOT_HEX, "trust": TRUST_ROSTER}


@contextmanager
def chart(path: Path) -> Iterator[Any]:
    with helm.Chart.load(str(path)) as c:
        yield c


def render(path: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with chart(path) as c:
        out = c.render(values or {}, name="fl", namespace="fedseal")
    docs: list[dict[str, Any]] = []
    for name, text in sorted(out.items()):
        if name.endswith("NOTES.txt"):
            continue
        docs.extend(load_all_strict(text))
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (workload,) = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    return workload["spec"]["template"]["spec"]


COORD_VARIANTS = [
    {},
    {"metrics": {"enabled": False}},
    {"service": {"type": "ClusterIP"}, "resume": False},
    {"service": {"loadBalancerSourceRanges": ["198.51.100.0/24"]}, "persistence": {"storageClassName": "fast"}},
]
SITE_VARIANTS = [
    SITE_MIN,
    {**SITE_MIN, "gpu": {"enabled": True, "count": 2}, "image": {"repository": "fedseal-site-cuda", "tag": "0.1.0"}},
    {**SITE_MIN, "persistence": {"enabled": False}},
    {"data": {"existingClaim": "hospital-data", "subPath": "v3"}, "approvedRoot": ROOT_HEX, "trust": TRUST_ROSTER},
    {**SITE_MIN, "trust": {"rosterSecret": "consortium", "peers": {"site-b": KID_B}},
     "privacy": {"min_cohort": 4, "max_colluding_fraction": 0.25}},
    {**SITE_MIN, "trust": {"peers": {"site-b": KID_B, "site-c": KID_C}}},
]


@pytest.mark.parametrize("path", [COORD, SITE], ids=["coordinator", "site"])
def test_helm_lint_reports_no_errors(path: Path) -> None:
    values = SITE_MIN if path == SITE else {}
    result = helm.lint(str(path), values=values)
    assert result["errors"] == []
    # Severity 1 is INFO (e.g. "icon is recommended"); warnings (2) and errors (4) fail.
    assert [m for m in result["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize(
    ("path", "values"),
    [(COORD, v) for v in COORD_VARIANTS] + [(SITE, v) for v in SITE_VARIANTS],
    ids=[f"coordinator-{i}" for i in range(len(COORD_VARIANTS))] + [f"site-{i}" for i in range(len(SITE_VARIANTS))],
)
def test_every_rendered_builtin_object_validates_against_the_strict_kubernetes_schema(
    path: Path, values: dict[str, Any]
) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate not installed; CI needs: pip install -r deploy/requirements-lint.txt",
    )
    docs = render(path, values)
    assert docs
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kv.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("path", [COORD, SITE], ids=["coordinator", "site"])
def test_values_schema_is_valid_draft7_and_accepts_the_default_values(path: Path) -> None:
    schema = json.loads((path / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((path / "values.yaml").read_text())
    if path == SITE:
        values = {**values, "approvedRoot": ROOT_HEX, "data": {**values["data"], "hostPath": "/d"}}
    jsonschema.Draft7Validator(schema).validate(values)


@pytest.mark.parametrize(
    ("path", "values", "what"),
    [
        (COORD, {"config": {"run": {"strategy": "Krum"}}}, "strategy"),
        (COORD, {"config": {"run": {"rounds": 0}}}, "rounds"),
        (COORD, {"config": {"run": {"roundz": 3}}}, "roundz"),
        (COORD, {"securityContext": {"allowPrivilegeEscalation": True}}, "allowPrivilegeEscalation"),
        (COORD, {"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
        (COORD, {"ports": {"fleet": 70000, "audit": 9095, "metrics": 9464}}, "fleet"),
        (SITE, {**SITE_MIN, "coordinator": {"cidrs": ["0.0.0.0/0"]}}, "cidrs"),
        (SITE, {**SITE_MIN, "approvedRoot": "xyz"}, "approvedRoot"),
        (SITE, {**SITE_MIN, "siteName": "bad name!"}, "siteName"),
        (SITE, {**SITE_MIN, "config": {"site": {"name": "other"}}}, "site"),
        (SITE, {**SITE_MIN, "config": {"limits": {"min_cohort": 2}}}, "min_cohort"),
        (SITE, {**SITE_MIN, "config": {"privacy": {"allow_plain": True}}}, "privacy"),
        (SITE, {**SITE_MIN, "privacy": {"min_cohort": 1}}, "min_cohort"),
        (SITE, {**SITE_MIN, "privacy": {"max_colluding_fraction": 0.5}}, "max_colluding_fraction"),
        (SITE, {**SITE_MIN, "privacy": {"allow_plain": "yes"}}, "allow_plain"),
        (SITE, {**SITE_MIN, "privacy": {"min_cohorts": 3}}, "min_cohorts"),
        (SITE, {**SITE_MIN, "trust": {"peers": {"site-b": "not-a-key-id"}}}, "peers"),
        (SITE, {**SITE_MIN, "trust": {"peers": {"bad name!": KID_B}}}, "bad name!"),
        (SITE, {**SITE_MIN, "trust": {"roster": "roster.json"}}, "roster"),
    ],
)
def test_helm_refuses_values_that_break_the_schema(path: Path, values: dict[str, Any], what: str) -> None:
    with chart(path) as c, pytest.raises(helm.HelmError) as exc:
        c.validate_schema(values)
    assert what in str(exc.value)


def test_site_chart_refuses_to_render_without_a_dataset_or_approved_root() -> None:
    with chart(SITE) as c:
        with pytest.raises(helm.HelmError, match=r"data\.existingClaim or data\.hostPath"):
            c.render({"approvedRoot": ROOT_HEX}, name="fl", namespace="x")
        with pytest.raises(helm.HelmError, match="approvedRoot"):
            c.render({"data": {"hostPath": "/d"}, "trust": TRUST_ROSTER}, name="fl", namespace="x")


def test_site_chart_refuses_to_render_without_a_trust_anchor() -> None:
    base = {"data": {"hostPath": "/d"}, "approvedRoot": ROOT_HEX}
    with chart(SITE) as c:
        with pytest.raises(helm.HelmError, match=r"set a trust anchor: trust\.rosterConfigMap"):
            c.render(base, name="fl", namespace="x")
        with pytest.raises(helm.HelmError, match="set a trust anchor"):
            c.render({**base, "trust": {"rosterConfigMap": "", "rosterSecret": "", "peers": {}}}, name="fl", namespace="x")
        with pytest.raises(helm.HelmError, match=r"only one of trust\.rosterConfigMap and trust\.rosterSecret"):
            c.render({**base, "trust": {"rosterConfigMap": "a", "rosterSecret": "b"}}, name="fl", namespace="x")
        # Without a roster, [peers] must name enough other sites for min_known_peers (default 2);
        # the site's own entry does not count.
        with pytest.raises(helm.HelmError, match=r"names 1 other site\(s\).*min_known_peers = 2"):
            c.render({**base, "siteName": "site-a", "trust": {"peers": {"site-a": KID_C, "site-b": KID_B}}},
                     name="fl", namespace="x")
        assert c.render({**base, "trust": {"peers": {"site-b": KID_B}}, "privacy": {"min_known_peers": 1}},
                        name="fl", namespace="x")


def test_coordinator_public_service_exposes_only_the_fleet_api_and_the_audit_service() -> None:
    docs = render(COORD)
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    public = services["fl-fedseal-coordinator"]
    assert public["spec"]["type"] == "LoadBalancer"
    assert sorted(p["port"] for p in public["spec"]["ports"]) == [9092, 9095]
    for svc in services.values():
        ports = {p["port"] for p in svc["spec"]["ports"]}
        assert not ports & {9091, 9093}, "ServerAppIo / Control API must never be in a Service"
    metrics = services["fl-fedseal-coordinator-metrics"]
    assert metrics["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in metrics["spec"]["ports"]] == [9464]


def test_coordinator_network_policy_admits_sites_on_9092_9095_and_only_monitoring_on_9464() -> None:
    docs = render(COORD)
    pol = one(docs, "NetworkPolicy")["spec"]
    assert sorted(pol["policyTypes"]) == ["Egress", "Ingress"]
    rules = pol["ingress"]
    site_rule, metrics_rule = rules
    assert sorted(p["port"] for p in site_rule["ports"]) == [9092, 9095]
    assert [p["port"] for p in metrics_rule["ports"]] == [9464]
    (peer,) = metrics_rule["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    # Egress: DNS only.
    assert all(p["port"] == 53 for rule in pol["egress"] for p in rule["ports"])
    # Without metrics, nothing may reach 9464.
    pol_nometrics = one(render(COORD, {"metrics": {"enabled": False}}), "NetworkPolicy")["spec"]
    assert [sorted(p["port"] for p in r["ports"]) for r in pol_nometrics["ingress"]] == [[9092, 9095]]
    assert by_kind(render(COORD, {"metrics": {"enabled": False}}), "ServiceMonitor") == []


def test_coordinator_runs_one_replica_with_its_state_on_a_persistent_volume() -> None:
    docs = render(COORD, {"persistence": {"size": "50Gi", "storageClassName": "fast"}})
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/var/lib/fedseal"]["name"] == claim["metadata"]["name"]
    assert container["args"] == ["run", "--config", "/etc/fedseal/server.toml", "--resume"]
    assert mounts["/etc/fedseal/keys"]["readOnly"] is True


def test_service_monitor_scrapes_the_metrics_port_of_the_metrics_service() -> None:
    docs = render(COORD)
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    selector = sm["spec"]["selector"]["matchLabels"]
    matching = [s for s in by_kind(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in matching] == ["fl-fedseal-coordinator-metrics"]


@pytest.mark.parametrize(("path", "values"), [(COORD, {}), (SITE, SITE_MIN)], ids=["coordinator", "site"])
def test_every_container_runs_non_root_read_only_without_privilege_escalation(
    path: Path, values: dict[str, Any]
) -> None:
    spec = pod_spec(render(path, values))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert all("valueFrom" not in e for e in c.get("env", [])), "keys come from files, not env"
    secret_vols = [v for v in spec["volumes"] if "secret" in v]
    assert len(secret_vols) == 1 and secret_vols[0]["name"] == "keys-secret"
    # The private keys reach the main container only through the 0600 copy (install-keys).
    (main,) = spec["containers"]
    assert secret_vols[0]["name"] not in {m["name"] for m in main["volumeMounts"]}


def test_rendered_server_toml_is_accepted_by_the_coordinator_config_loader(tmp_path: Path) -> None:
    config = pytest.importorskip("fedseal.server.config")
    docs = render(COORD, {"config": {"run": {"rounds": 7, "strategy": "FedAdam", "strategy_options": {"eta": 0.1}}}})
    text = one(docs, "ConfigMap")["data"]["server.toml"]
    path = tmp_path / "server.toml"
    path.write_text(text)
    cfg = config.load_server_config(path)
    assert cfg.run.rounds == 7 and cfg.run.strategy == "FedAdam"
    assert dict(cfg.run.strategy_options) == {"eta": 0.1}
    assert cfg.network.fleet_port == 9092 and cfg.network.metrics_port == 9464
    assert cfg.coordinator.state_dir == Path("/var/lib/fedseal")
    assert cfg.coordinator.roster.parent == Path("/var/lib/fedseal")
    assert cfg.tls.server_cert == Path("/etc/fedseal/keys/server.pem")
    off = one(render(COORD, {"metrics": {"enabled": False}}), "ConfigMap")["data"]["server.toml"]
    assert tomllib.loads(off)["network"]["metrics_port"] == 0


def test_rendered_client_toml_is_accepted_by_the_site_config_loader(tmp_path: Path) -> None:
    config = pytest.importorskip("fedseal.client.config")
    docs = render(SITE, {**SITE_MIN, "siteName": "hospital-7", "config": {"limits": {"max_epochs": 2}}})
    path = tmp_path / "client.toml"
    path.write_text(one(docs, "ConfigMap")["data"]["client.toml"])
    cfg = config.load_client_config(path)
    assert cfg.name == "hospital-7"
    assert cfg.approved_root == ROOT_HEX
    assert cfg.dataset_dir == Path("/data")
    assert cfg.ca_cert == Path("/etc/fedseal/keys/ca.pem")
    assert cfg.coordinator_key == Path("/etc/fedseal/keys/coordinator.pub")
    assert cfg.limits.max_epochs == 2
    assert cfg.insecure is False
    assert cfg.roster == Path("/etc/fedseal/consortium/roster.json")
    assert cfg.roster_authority == Path("/etc/fedseal/consortium/authority.key.pub")
    assert dict(cfg.peers) == {}
    # No privacy values: the product's safe defaults, and no [privacy] table at all.
    assert cfg.privacy == type(cfg.privacy)()
    assert cfg.privacy.allow_plain is False and cfg.privacy.min_cohort == 3
    assert "privacy" not in tomllib.loads(path.read_text())


def test_rendered_trust_anchor_and_privacy_reach_the_site_config_loader(tmp_path: Path) -> None:
    config = pytest.importorskip("fedseal.client.config")
    values = {
        **SITE_MIN,
        "trust": {"rosterSecret": "consortium", "rosterKey": "roster-v3.json", "peers": {"site-b": KID_B, "site.c": KID_C}},
        "privacy": {"min_cohort": 4, "min_known_peers": 3, "max_colluding_fraction": 0.25, "security_bits": 48,
                    "max_setup_attempts": 2},
    }
    docs = render(SITE, values)
    path = tmp_path / "client.toml"
    path.write_text(one(docs, "ConfigMap")["data"]["client.toml"])
    cfg = config.load_client_config(path)
    assert cfg.roster == Path("/etc/fedseal/consortium/roster.json")
    assert cfg.roster_authority == Path("/etc/fedseal/consortium/authority.key.pub")
    assert dict(cfg.peers) == {"site-b": KID_B, "site.c": KID_C.lower()}
    p = cfg.privacy
    assert (p.allow_plain, p.min_cohort, p.min_known_peers, p.max_colluding_fraction, p.security_bits,
            p.max_setup_attempts) == (False, 4, 3, 0.25, 48, 2)
    # Peers alone (no roster): no [trust] table, no consortium volume.
    alone = render(SITE, {**SITE_MIN, "trust": {"peers": {"site-b": KID_B, "site-c": KID_C}}})
    path.write_text(one(alone, "ConfigMap")["data"]["client.toml"])
    cfg = config.load_client_config(path)
    assert cfg.roster is None and cfg.roster_authority is None and sorted(cfg.peers) == ["site-b", "site-c"]
    assert "consortium" not in {v["name"] for v in pod_spec(alone)["volumes"]}


@pytest.mark.parametrize(
    ("trust", "source"),
    [({"rosterConfigMap": "fedseal-consortium"}, "configMap"), ({"rosterSecret": "fedseal-consortium"}, "secret")],
    ids=["configmap", "secret"],
)
def test_site_mounts_the_consortium_roster_and_authority_key_read_only(trust: dict[str, str], source: str) -> None:
    spec = pod_spec(render(SITE, {**SITE_MIN, "trust": {**trust, "authorityKey": "authority.pem"}}))
    (main,) = spec["containers"]
    mount = next(m for m in main["volumeMounts"] if m["name"] == "consortium")
    assert mount["mountPath"] == "/etc/fedseal/consortium" and mount["readOnly"] is True
    vol = next(v for v in spec["volumes"] if v["name"] == "consortium")
    body = vol[source]
    assert body.get("name", body.get("secretName")) == "fedseal-consortium"
    assert body["items"] == [
        {"key": "roster.json", "path": "roster.json"},
        {"key": "authority.pem", "path": "authority.key.pub"},
    ]
    # The roster is mounted into the site only, never into the key-installing init container.
    (init,) = spec["initContainers"]
    assert "consortium" not in {m["name"] for m in init["volumeMounts"]}


def test_site_network_policy_allows_egress_only_to_the_coordinator_and_no_ingress() -> None:
    docs = render(SITE, {**SITE_MIN, "coordinator": {"cidrs": ["203.0.113.10/32", "203.0.113.11/32"], "allowDns": False}})
    pol = one(docs, "NetworkPolicy")["spec"]
    assert pol["ingress"] == []
    assert sorted(pol["policyTypes"]) == ["Egress", "Ingress"]
    (rule,) = pol["egress"]
    assert [p["ipBlock"]["cidr"] for p in rule["to"]] == ["203.0.113.10/32", "203.0.113.11/32"]
    assert sorted(p["port"] for p in rule["ports"]) == [9092, 9095]
    with_dns = one(render(SITE, SITE_MIN), "NetworkPolicy")["spec"]["egress"]
    assert len(with_dns) == 2 and all(p["port"] == 53 for p in with_dns[1]["ports"])


def test_site_mounts_its_data_read_only_and_requests_gpus_only_when_enabled() -> None:
    cpu = pod_spec(render(SITE, SITE_MIN))
    (container,) = cpu["containers"]
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data")
    assert data["readOnly"] is True
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert container["args"] == ["run", "--config", "/etc/fedseal/client.toml"]
    gpu = pod_spec(render(SITE, SITE_VARIANTS[1]))
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    pvc = pod_spec(render(SITE, SITE_VARIANTS[3]))
    vol = next(v for v in pvc["volumes"] if v["name"] == "data")
    assert vol["persistentVolumeClaim"] == {"claimName": "hospital-data", "readOnly": True}


def test_site_runs_exactly_one_instance_of_its_identity() -> None:
    dep = one(render(SITE, SITE_MIN), "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"


MULTI_GPU_SITE = {
    **SITE_MIN,
    "image": {"repository": "fedseal-site-cuda", "tag": "0.1.0"},
    "gpu": {"enabled": True, "count": 4},
    "sharedMemory": {"sizeLimit": "8Gi"},
    "config": {"training": {"devices": ["cuda:0", "cuda:1", "cuda:2", "cuda:3"], "rank_timeout_s": 300}},
}


def test_a_multi_gpu_site_requests_its_gpus_mounts_shared_memory_and_trains_on_them(tmp_path: Path) -> None:
    """deploy/README.md "Multi-GPU site": the values render, validate strictly, and the rendered
    client.toml's [training] reaches the site's config loader."""
    config = pytest.importorskip("fedseal.client.config")
    distributed = pytest.importorskip("fedseal.client.distributed")
    lint = helm.lint(str(SITE), values=MULTI_GPU_SITE)
    assert lint["errors"] == [] and [m for m in lint["messages"] if m["severity"] > 1] == []
    docs = render(SITE, MULTI_GPU_SITE)
    spec = pod_spec(docs)
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    path = tmp_path / "client.toml"
    path.write_text(one(docs, "ConfigMap")["data"]["client.toml"])
    cfg = config.load_client_config(path)
    assert cfg.devices == distributed.Devices("cuda", gpus=(0, 1, 2, 3), timeout_s=300.0)
    plain = pod_spec(render(SITE, SITE_MIN))
    assert all(v["name"] != "dshm" for v in plain["volumes"])


@pytest.mark.parametrize("devices", ["gpu", "cuda:x", ["cpu:2"], [], ["cuda:0", "cuda:0"]])
def test_site_chart_refuses_a_malformed_training_devices(devices: object) -> None:
    with chart(SITE) as c, pytest.raises(helm.HelmError) as exc:
        c.validate_schema({**SITE_MIN, "config": {"training": {"devices": devices}}})
    assert "devices" in str(exc.value)
