"""The Kubernetes manifests of deploy/k8s, as ``kubectl kustomize`` renders every overlay: valid against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict), the CRDs' required fields present, and in agreement with the
service they deploy: probes on routes the app serves, the port and the settings the pod would start with, the drain
inside the grace period, a restricted security context, selectors that select, one scaling signal for KEDA and the
HPA. The scaling queries run against a real Prometheus scraping a real service in tests/deploy/test_live_metrics.py.
No cluster here: nothing is applied.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from asgi_lifespan import LifespanManager

from service.http.app import create_app
from service.settings import Settings, SettingsError, get_settings
from tests.deploy.k8s import (
    EXAMPLE_SECRETS,
    KUBECTL,
    NAMESPACE,
    OVERLAYS,
    STATEFULSET,
    Manifest,
    RenderError,
    adapter_rule,
    container,
    container_env,
    image_env,
    image_user,
    keda_trigger,
    labels_match,
    objects,
    one,
    pod_spec,
    render_composed,
    render_overlay,
)
from tests.deploy.stack import COMPOSE, COMPOSE_CPU, JOB
from tests.synthetic import make_image_bytes, make_synthetic_bundle

pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not found: the manifests are checked as `kubectl kustomize` renders them"
)

# Schemas to validate against: the oldest Kubernetes the manifests claim (docs/kubernetes.md: 1.27, where the
# StatefulSet claim retention and the PDB's unhealthyPodEvictionPolicy are on by default), the kubectl of this
# machine, and the newest kubernetes-validate knows (a field removed since would show).
K8S_VERSIONS = ("1.27", "1.32", kubernetes_validate.latest_version())
CRD_GROUPS = {"monitoring.coreos.com", "keda.sh"}  # no OpenAPI schema in kubernetes-validate: checked below
# Volume types the "restricted" Pod Security Standard admits.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
WRITABLE_VOLUMES = {"emptyDir", "persistentVolumeClaim"}
INFERENCE_ROUTE = re.compile(r'route=~"([^"]+)"')


def _target(overlay: str) -> str:
    return "gpu" if overlay == "gpu" else "cpu"


def _image_target(rendered: tuple[Manifest, ...]) -> str:
    return str(container(rendered)["image"]).rsplit("-", 1)[1]


def _settings(rendered: tuple[Manifest, ...], monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Settings:
    """The settings ``aoi serve`` builds in the pod: the image's ENV, overridden by the pod's environment."""
    for key in [k for k in os.environ if k.startswith("AOI_")]:
        monkeypatch.delenv(key)
    env = {**image_env(_image_target(rendered)), **container_env(rendered, **kw)}
    for key, value in env.items():
        if key.startswith("AOI_"):
            monkeypatch.setenv(key, value)
    return get_settings()


def _mounts(rendered: tuple[Manifest, ...]) -> dict[str, tuple[Manifest, Manifest]]:
    """mountPath -> (volumeMount, volume source: a pod volume or a volumeClaimTemplate as {persistentVolumeClaim})."""
    spec = pod_spec(rendered)
    volumes: dict[str, Manifest] = {v["name"]: v for v in spec.get("volumes", [])}
    for claim in one(rendered, "StatefulSet", STATEFULSET)["spec"].get("volumeClaimTemplates", []):
        volumes[claim["metadata"]["name"]] = {"persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container(rendered)["volumeMounts"]}


def _writable(rendered: tuple[Manifest, ...], path: Path) -> bool:
    """Whether the container can write at ``path`` with a read-only root filesystem: under a writable volume."""
    for mount_path, (mount, volume) in _mounts(rendered).items():
        if path.is_relative_to(mount_path) and not mount.get("readOnly") and WRITABLE_VOLUMES & set(volume):
            return True
    return False


def _secret_examples() -> dict[str, dict[str, str]]:
    return {s["metadata"]["name"]: s["stringData"] for s in yaml.safe_load_all(EXAMPLE_SECRETS.read_text("utf-8"))}


# Ids "cpu-overlay", ...: a bare "gpu" id would be read as the gpu marker (tests/conftest.py) and skipped here.
@pytest.fixture(scope="module", params=OVERLAYS, ids=[f"{o}-overlay" for o in OVERLAYS])
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def rendered(overlay: str) -> tuple[Manifest, ...]:
    return render_overlay(overlay)


# --- rendering and schemas -----------------------------------------------------------------------------------------


def test_every_overlay_renders(overlay: str, rendered: tuple[Manifest, ...]) -> None:
    kinds = {o["kind"] for o in rendered}
    assert {"Namespace", "StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap", "ServiceMonitor"} <= kinds
    assert ("ScaledObject" in kinds) == (overlay == "keda")
    assert ("HorizontalPodAutoscaler" in kinds) == (overlay == "hpa")
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in rendered]
    assert len(names) == len(set(names)), "an object rendered twice"


def test_the_components_compose_with_the_gpu_overlay(tmp_path: Path) -> None:
    """GPU pods forwarding to the plant's PostgreSQL, autoscaled by KEDA: the combination docs/kubernetes.md shows."""
    rendered = render_composed(tmp_path, "gpu", ("with-postgres", "keda"))
    env = container_env(rendered)
    assert env["AOI_BACKEND"] == "tensorrt" and env["AOI_CENTRAL__DSN_FILE"].startswith("/run/secrets/")
    assert container(rendered)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert one(rendered, "ScaledObject")["spec"]["scaleTargetRef"]["name"] == STATEFULSET
    for obj in rendered:
        if obj["kind"] not in {"ServiceMonitor", "ScaledObject"}:
            kubernetes_validate.validate(obj, "1.32", strict=True)


def test_keda_and_hpa_do_not_compose(tmp_path: Path) -> None:
    """Two autoscalers on one StatefulSet fight over its replicas: the second component's patch fails the build."""
    with pytest.raises(RenderError, match="replicas"):
        render_composed(tmp_path, "cpu", ("keda", "hpa"))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schemas(rendered: tuple[Manifest, ...], version: str) -> None:
    for obj in rendered:
        if obj["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(map(str, exc.absolute_path))
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({version}): {exc.message} at {where}")


def test_the_validation_is_strict() -> None:
    """A misspelt field and a wrong type are refused: the schema check above is not vacuous."""
    statefulset = one(render_overlay("cpu"), "StatefulSet")
    typo = copy.deepcopy(statefulset)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = copy.deepcopy(statefulset)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, "1.32", strict=True)


def test_the_custom_resources_have_their_required_fields(rendered: tuple[Manifest, ...]) -> None:
    """ServiceMonitor (monitoring.coreos.com/v1) and ScaledObject (keda.sh/v1alpha1): the fields their CRDs require,
    with the types they require, and references that resolve to rendered objects."""
    monitor = one(rendered, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert isinstance(monitor["spec"]["selector"]["matchLabels"], dict)
    for endpoint in monitor["spec"]["endpoints"]:
        assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
        assert re.fullmatch(r"\d+s", endpoint["interval"]) and re.fullmatch(r"\d+s", endpoint["scrapeTimeout"])
    for scaled in objects(rendered, "ScaledObject"):
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled["spec"]
        target = spec["scaleTargetRef"]
        one(rendered, target["kind"], target["name"])
        assert target["apiVersion"] == "apps/v1"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["fallback"]["failureThreshold"] >= 1 and spec["fallback"]["replicas"] >= spec["minReplicaCount"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus" and trigger["metricType"] in {"AverageValue", "Value"}
            metadata = trigger["metadata"]
            assert all(isinstance(v, str) for v in metadata.values()), "KEDA trigger metadata values are strings"
            assert {"serverAddress", "query", "threshold"} <= set(metadata)
            assert metadata["serverAddress"].startswith("http") and float(metadata["threshold"]) > 0


# --- the service the pods run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """What the real app (synthetic bundle, ONNX Runtime CPU) answered in one lifespan."""

    probe_status: dict[str, int]  # GET path -> status, for the probe and scrape paths of the manifests
    documented: set[str]  # the OpenAPI paths
    route_labels: dict[str, str]  # request path sent -> its route label on aoi_request_duration_seconds


def _probe_paths() -> set[str]:
    rendered = render_overlay("cpu")
    spec = container(rendered)
    paths = {spec[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    return paths | {e["path"] for e in one(rendered, "ServiceMonitor")["spec"]["endpoints"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """Start the app, GET the probe paths, then send one v1 and one v2 inference request (one at a time) and read the
    route label each got from /metrics."""
    tmp = tmp_path_factory.mktemp("app")
    bundle = make_synthetic_bundle(tmp / "bundle", size=64)
    settings = Settings(bundle=bundle, backend="onnxruntime-cpu", data_dir=tmp / "data", intra_op_threads=1)
    app = create_app(settings)
    frame = make_image_bytes(64, 64, "png")
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(frame).decode()]}
    v2_body = {"inputs": [image]}

    async def run() -> Served:
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
                status = {p: (await client.get(p)).status_code for p in sorted(_probe_paths())}
                model = (await client.get("/v1/model")).json()["name"]
                labels: dict[str, str] = {}
                sent = [
                    client.build_request("POST", "/v1/inspect", content=frame, headers={"Content-Type": "image/png"}),
                    client.build_request("POST", f"/v2/models/{model}/infer", json=v2_body),
                ]
                for request in sent:
                    path = request.url.path
                    before = _route_counts(await client.get("/metrics"))
                    await client.send(request)
                    after = _route_counts(await client.get("/metrics"))
                    (labels[path],) = [r for r in after if after[r] > before.get(r, 0.0) and r != "/metrics"]
                return Served(status, set(app.openapi()["paths"]), labels)

    return asyncio.run(run())


def _route_counts(metrics: httpx.Response) -> dict[str, float]:
    """route label -> requests answered, from aoi_request_duration_seconds_count (all statuses)."""
    counts: dict[str, float] = {}
    series = r'^aoi_request_duration_seconds_count\{[^}]*route="([^"]*)"[^}]*\} (\S+)$'
    for route, value in re.findall(series, metrics.text, flags=re.M):
        counts[route] = counts.get(route, 0.0) + float(value)
    return counts


def test_probes_and_the_scrape_name_routes_the_app_serves(served: Served) -> None:
    """The real app answers every probe path and the ServiceMonitor's path with 200 once warm."""
    paths = _probe_paths()
    assert paths == {"/healthz", "/readyz", "/metrics"}
    assert paths <= served.documented, "probe paths are documented routes"
    assert served.probe_status == dict.fromkeys(paths, 200)


def test_the_scaling_signal_counts_v1_and_v2_inference(served: Served) -> None:
    """The route label the service gives a v1 inspection and an Open Inference Protocol v2 infer request both match
    the scaling query's route selector: the autoscaler sees the work of either protocol."""
    (pattern,) = set(INFERENCE_ROUTE.findall(keda_trigger(render_overlay("keda"))["metadata"]["query"]))
    for path, label in served.route_labels.items():
        assert re.fullmatch(pattern, label), (
            f"POST {path} is labelled route={label!r} on aoi_request_duration_seconds, which the scaling query "
            f"(route=~{pattern!r}) does not count"
        )


def test_the_port_is_the_one_the_service_listens_on(
    rendered: tuple[Manifest, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(rendered, monkeypatch)
    (port,) = container(rendered)["ports"]
    assert port["name"] == "http" and port["containerPort"] == settings.port == Settings.model_fields["port"].default
    spec = container(rendered)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["httpGet"]["port"] == "http"
    for service in objects(rendered, "Service"):
        (service_port,) = service["spec"]["ports"]
        assert service_port["targetPort"] == "http" and service_port["port"] == settings.port


def test_the_pod_settings_are_valid(rendered: tuple[Manifest, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's ENV plus the pod's environment is a valid Settings; every place the service writes is a writable
    volume (the root filesystem is read-only), the bundle is on the read-only bundles volume, and the station id is
    the pod's stable name."""
    settings = _settings(rendered, monkeypatch)
    assert settings.station_id == f"{NAMESPACE}.{STATEFULSET}-0"
    env = {**image_env(_image_target(rendered)), **container_env(rendered)}
    written = [settings.data_dir, settings.engine_cache, settings.openvino_cache or settings.engine_cache / "openvino"]
    written += [Path("/tmp")] + ([Path(env["CUDA_CACHE_PATH"])] if "CUDA_CACHE_PATH" in env else [])
    for path in written:
        assert _writable(rendered, path), f"{path}: not on a writable volume"
    mount, volume = _mounts(rendered)["/bundles"]
    assert settings.bundle.is_relative_to("/bundles") and mount["readOnly"] and volume["persistentVolumeClaim"]
    data_mount, _ = _mounts(rendered)[str(settings.data_dir)]
    claims = one(rendered, "StatefulSet")["spec"]["volumeClaimTemplates"]
    assert data_mount["name"] in {c["metadata"]["name"] for c in claims}, "data_dir is the pod's own claim"
    assert not settings.auth.keys("inspect") and not settings.auth.keys("admin")  # no Secret: open, as compose


def test_the_api_keys_come_from_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Secret of examples/secrets.yaml present, its JSON lists become the service's keys."""
    settings = _settings(render_overlay("cpu"), monkeypatch, secrets=_secret_examples())
    assert settings.auth.keys("inspect") == (b"<inspect key 1>", b"<inspect key 2>")
    assert settings.auth.keys("admin") == (b"<admin key>",)


def test_service_links_are_off_because_the_service_refuses_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubelet's service links for the Service aoi-inspect would be AOI_INSPECT_* variables, which the service
    refuses as unknown settings: enableServiceLinks must stay false."""
    rendered = render_overlay("cpu")
    assert pod_spec(rendered)["enableServiceLinks"] is False
    _settings(rendered, monkeypatch)
    for service in objects(rendered, "Service"):
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        monkeypatch.setenv(f"{prefix}_SERVICE_HOST", "10.0.0.1")
        monkeypatch.setenv(f"{prefix}_PORT", "tcp://10.0.0.1:8000")
    with pytest.raises(SettingsError, match="AOI_INSPECT_"):
        get_settings()


def test_the_drain_fits_in_the_grace_period(rendered: tuple[Manifest, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """Termination: preStop sleep (endpoints drop the pod), then SIGTERM and the service's drain bounded by
    stop_timeout_ms, then time to exit: all before the kubelet's SIGKILL at terminationGracePeriodSeconds."""
    settings = _settings(rendered, monkeypatch)
    command = container(rendered)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    grace_s = pod_spec(rendered)["terminationGracePeriodSeconds"]
    assert 2 <= pre_stop_s <= 15
    assert grace_s >= pre_stop_s + settings.stop_timeout_ms / 1000 + 5


def test_the_startup_probe_covers_load_and_warm_up(rendered: tuple[Manifest, ...]) -> None:
    """At least the start period the compose stack gives the same image (600 s on GPU: TensorRT engine builds; 60 s
    on CPU), so a first start is never killed where compose would have waited."""
    compose = {"gpu": COMPOSE, "cpu": COMPOSE_CPU}[_image_target(rendered)]
    # The cpu override uses Compose's !reset tag, which YAML loaders refuse: read the one value from the text.
    start_period = re.search(r"^\s+start_period: (\d+)s$", compose.read_text(encoding="utf-8"), flags=re.M)
    assert start_period, f"{compose.name}: no healthcheck start_period"
    probe = container(rendered)["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= int(start_period[1])
    assert probe["httpGet"]["path"] == "/healthz"  # answered only once warm: the lifespan warms up before serving


def test_resources_are_requested_and_limited(overlay: str, rendered: tuple[Manifest, ...]) -> None:
    resources = container(rendered)["resources"]
    for name in ("cpu", "memory"):
        assert resources["requests"][name] == resources["limits"][name], f"{name}: Guaranteed QoS wants them equal"
    assert ("nvidia.com/gpu" in resources["limits"]) == (overlay == "gpu")


# --- security --------------------------------------------------------------------------------------------------------


def test_the_pod_is_non_root_with_a_read_only_root(rendered: tuple[Manifest, ...]) -> None:
    """The "restricted" Pod Security Standard, which the namespace enforces, and the image's own user."""
    spec = pod_spec(rendered)
    pod = spec["securityContext"]
    uid, gid = image_user(_image_target(rendered))
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid and pod["runAsGroup"] == gid
    assert pod["fsGroup"] == gid and pod["seccompProfile"]["type"] == "RuntimeDefault"
    for c in spec["containers"] + spec.get("initContainers", []):
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"] and "add" not in ctx["capabilities"]
        assert not ctx.get("privileged") and all("hostPort" not in p for p in c.get("ports", []))
    for volume in spec["volumes"]:
        assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert spec["automountServiceAccountToken"] is False
    namespace = one(rendered, "Namespace")["metadata"]
    assert namespace["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_secret_the_pods_read_is_in_the_examples(rendered: tuple[Manifest, ...]) -> None:
    """Secrets are not rendered (no keys or DSN in git): each one referenced, and each key of it, is in
    examples/secrets.yaml, which itself validates."""
    examples = _secret_examples()
    for example in yaml.safe_load_all(EXAMPLE_SECRETS.read_text("utf-8")):
        kubernetes_validate.validate(example, "1.32", strict=True)
        assert example["metadata"]["namespace"] == NAMESPACE
    assert not objects(rendered, "Secret")
    for var in container(rendered).get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in examples[ref["name"]], var["name"]
    for volume in pod_spec(rendered)["volumes"]:
        if "secret" in volume:
            keys = {item["key"] for item in volume["secret"]["items"]}
            assert keys <= set(examples[volume["secret"]["secretName"]])


def test_with_postgres_reads_the_dsn_from_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = render_overlay("with-postgres")
    settings = _settings(rendered, monkeypatch)
    assert settings.central.enabled and settings.central.dsn is None and settings.records.enabled
    assert settings.line_id and not settings.central.migrate
    dsn_file = settings.central.dsn_file
    assert dsn_file is not None
    mount, volume = _mounts(rendered)[str(dsn_file.parent)]
    assert mount["readOnly"] and volume["secret"]["items"] == [{"key": "dsn", "path": dsn_file.name}]
    assert not volume["secret"].get("optional"), "a forwarding station must not start without its DSN"
    assert volume["secret"]["defaultMode"] & 0o007 == 0, "the DSN file is not world-readable"
    assert "AOI_CENTRAL__DSN" not in container_env(rendered), "the DSN is a file, never an environment variable"


# --- selectors -------------------------------------------------------------------------------------------------------


def test_the_selectors_select_the_pods(rendered: tuple[Manifest, ...]) -> None:
    statefulset = one(rendered, "StatefulSet", STATEFULSET)
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert labels_match(statefulset["spec"]["selector"]["matchLabels"], pod_labels)
    pdb = one(rendered, "PodDisruptionBudget")
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] == 1
    for service in objects(rendered, "Service"):
        assert labels_match(service["spec"]["selector"], pod_labels)
    headless = one(rendered, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    monitor = one(rendered, "ServiceMonitor")
    scraped = [
        s
        for s in objects(rendered, "Service")
        if labels_match(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in scraped] == [JOB], "one Service scraped, named as the job label of deploy/"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in scraped[0]["spec"]["ports"]}
    for obj in rendered:
        expected = "monitoring" if obj["metadata"]["name"] == "aoi-inspect-prometheus-adapter" else NAMESPACE
        assert obj["metadata"].get("namespace", NAMESPACE) == expected, obj["metadata"]["name"]


def test_gpu_and_cpu_overlays(overlay: str, rendered: tuple[Manifest, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = pod_spec(rendered)
    settings = _settings(rendered, monkeypatch)
    assert container(rendered)["image"] == f"aoi-inspect:0.1.0-{_target(overlay)}"
    if overlay == "gpu":
        assert spec["runtimeClassName"] == "nvidia" and settings.backend == "tensorrt"
        assert container(rendered)["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert settings.engine_cache.is_relative_to(settings.data_dir), "engines survive a restart on the claim"
    else:
        assert "runtimeClassName" not in spec and settings.backend == "auto"


# --- autoscaling -----------------------------------------------------------------------------------------------------


def test_keda_and_the_hpa_scale_on_the_same_signal() -> None:
    """One signal, written once per overlay: the KEDA query sums the adapter's per-pod series; same route selector,
    window, target and bounds; the autoscaler, not the manifest, owns the replica count."""
    keda, hpa = render_overlay("keda"), render_overlay("hpa")
    trigger = keda_trigger(keda)
    query = trigger["metadata"]["query"]
    rule = adapter_rule(hpa)
    assert f'namespace="{NAMESPACE}"' in query and f'job="{JOB}"' in query
    assert INFERENCE_ROUTE.findall(query) == INFERENCE_ROUTE.findall(rule.metrics_query)
    series = rule.series_query.split("{", 1)[0]
    assert query.startswith(f"sum(rate({series}{{") and query.endswith("[1m]))")
    assert "rate(<<.Series>>{<<.LabelMatchers>>," in rule.metrics_query and "[1m]" in rule.metrics_query
    autoscaler = one(hpa, "HorizontalPodAutoscaler")["spec"]
    (metric,) = autoscaler["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule.metric
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": trigger["metadata"]["threshold"]}
    scaled = one(keda, "ScaledObject")["spec"]
    assert (autoscaler["minReplicas"], autoscaler["maxReplicas"]) == (
        scaled["minReplicaCount"],
        scaled["maxReplicaCount"],
    )
    assert autoscaler["behavior"] == scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    for rendered in (keda, hpa):
        target = one(rendered, "StatefulSet", STATEFULSET)
        assert "replicas" not in target["spec"]
    ref = autoscaler["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("StatefulSet", STATEFULSET)
    assert one(render_overlay("cpu"), "StatefulSet")["spec"]["replicas"] == scaled["minReplicaCount"]


def test_the_scaling_routes_are_the_inference_routes(tmp_path: Path) -> None:
    """The route selector of the scaling query matches the app's inference routes (v1 and Open Inference Protocol v2,
    as the request-duration route label names them) and no other route."""
    (pattern,) = set(INFERENCE_ROUTE.findall(keda_trigger(render_overlay("keda"))["metadata"]["query"]))
    app = create_app(Settings(bundle=tmp_path / "unused", data_dir=tmp_path / "data"))
    routes: dict[str, dict[str, Any]] = app.openapi()["paths"]
    matched = {path for path in routes if re.fullmatch(pattern, path)}  # PromQL regexes are anchored
    assert "/v1/inspect" in matched
    inference = {p for p in routes if p == "/v1/inspect" or (p.startswith("/v2/models/") and p.endswith("/infer"))}
    assert matched == inference
    assert all(set(routes[p]) == {"post"} for p in matched)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not found: install Debian's prometheus package")
def test_the_scaling_queries_pass_promtool(tmp_path: Path) -> None:
    """Both queries as Prometheus parses them (the live test also runs them): wrapped into a rules file for promtool."""
    query = keda_trigger(render_overlay("keda"))["metadata"]["query"]
    adapter = adapter_rule(render_overlay("hpa")).promql(NAMESPACE, [f"{STATEFULSET}-0", f"{STATEFULSET}-1"])
    rules = {
        "groups": [
            {
                "name": "k8s-scaling",
                "rules": [
                    {"record": "aoi:inspect_concurrency:keda", "expr": query},
                    {"record": "pod:aoi_inspect_concurrency:adapter", "expr": adapter},
                    {"record": "aoi:inspect_series:adapter", "expr": adapter_rule(render_overlay("hpa")).series_query},
                ],
            }
        ]
    }
    path = tmp_path / "scaling.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    promtool = shutil.which("promtool")
    assert promtool is not None
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
