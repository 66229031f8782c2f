"""Readers for the Kubernetes manifests of deploy/k8s, shared by tests/deploy/test_k8s.py and the live Prometheus test.

Manifests are read as ``kubectl kustomize`` renders them (what ``kubectl apply -k`` would send), never from the source
files, so patches, generators and components are part of what is checked. The autoscaling queries returned here are
the single copy both the structural tests and the live test (tests/deploy/test_live_metrics.py) evaluate.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.stack import DEPLOY, DOCKERFILE

K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "with-postgres", "keda", "hpa")
COMPONENTS = K8S / "components"
EXAMPLE_SECRETS = K8S / "examples" / "secrets.yaml"
KUBECTL = shutil.which("kubectl")
NAMESPACE = "aoi-inspect"  # the base's namespace: the KEDA query names it
STATEFULSET = "aoi-inspect"
# The labels the Prometheus Operator puts on a pod's series when it scrapes it through the ServiceMonitor (besides
# job = the Service name): the live test's Prometheus gives its one target these.
POD_TARGET_LABELS = {"namespace": NAMESPACE, "pod": f"{STATEFULSET}-0"}

Manifest = dict[str, Any]


class RenderError(Exception):
    """``kubectl kustomize`` refused a kustomization (its stderr is the message)."""


@functools.cache
def render(directory: Path) -> tuple[Manifest, ...]:
    """Every object ``kubectl kustomize <directory>`` renders.

    Raises:
        RenderError: kustomize exited non-zero.
    """
    assert KUBECTL is not None, "kubectl is not installed"
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render_overlay(name: str) -> tuple[Manifest, ...]:
    return render(K8S / "overlays" / name)


def render_composed(tmp: Path, base: str, components: tuple[str, ...]) -> tuple[Manifest, ...]:
    """An overlay composed the way docs/kubernetes.md tells a plant to: ``overlays/<base>`` plus ``components``, in a
    kustomization outside the repository (kustomize wants relative paths)."""
    rel = Path(os.path.relpath(K8S, tmp))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(rel / "overlays" / base)],
        "components": [str(rel / "components" / c) for c in components],
    }
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    return render(tmp)


def objects(rendered: tuple[Manifest, ...], kind: str) -> list[Manifest]:
    return [o for o in rendered if o["kind"] == kind]


def one(rendered: tuple[Manifest, ...], kind: str, name: str | None = None) -> Manifest:
    found = [o for o in objects(rendered, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(rendered: tuple[Manifest, ...]) -> Manifest:
    return dict(one(rendered, "StatefulSet", STATEFULSET)["spec"]["template"]["spec"])


def container(rendered: tuple[Manifest, ...], name: str = "inspect") -> Manifest:
    (found,) = [c for c in pod_spec(rendered)["containers"] if c["name"] == name]
    return dict(found)


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- the container's environment, as the kubelet builds it ---------------------------------------------------------


def image_env(target: str) -> dict[str, str]:
    """The ``ENV`` of the Dockerfile stage ``target`` (cpu or gpu): what the container starts with before the pod's
    own variables."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    stage = re.search(rf"^FROM \S+ AS {target}$(.*?)(?=^FROM |\Z)", text, flags=re.M | re.S)
    assert stage, f"no stage {target} in the Dockerfile"
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", stage[1], flags=re.M):
        for token in shlex.split(line):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def image_user(target: str) -> tuple[int, int]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    stage = re.search(rf"^FROM \S+ AS {target}$(.*?)(?=^FROM |\Z)", text, flags=re.M | re.S)
    assert stage
    user = re.search(r"^USER (\d+):(\d+)$", stage[1], flags=re.M)
    assert user, f"the {target} stage sets no numeric USER"
    return int(user[1]), int(user[2])


def container_env(
    rendered: tuple[Manifest, ...], *, pod: str = f"{STATEFULSET}-0", secrets: dict[str, dict[str, str]] | None = None
) -> dict[str, str]:
    """The pod's environment for the ``inspect`` container as the kubelet sets it: ``envFrom`` ConfigMaps, then ``env``
    in order (``$(VAR)`` expanded from the variables defined before it), downward-API fields for pod ``pod``, Secret
    keys from ``secrets`` (name -> data; a missing optional key is left out, a missing required one fails)."""
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects(rendered, "ConfigMap")}
    namespace = one(rendered, "StatefulSet", STATEFULSET)["metadata"]["namespace"]
    fields = {"metadata.name": pod, "metadata.namespace": namespace}
    spec = container(rendered)
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), var["value"])
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            env[var["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in ref:
            key_ref = ref["secretKeyRef"]
            value = (secrets or {}).get(key_ref["name"], {}).get(key_ref["key"])
            if value is not None:
                env[var["name"]] = value
            else:
                assert key_ref.get("optional"), f"{var['name']}: Secret {key_ref['name']} is required"
        else:
            raise AssertionError(f"{var['name']}: a source this reader does not know ({ref})")
    return env


# --- autoscaling ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterRule:
    series_query: str
    metric: str  # the name the adapter serves it under (custom.metrics.k8s.io)
    metrics_query: str  # with the adapter's <<.Series>> / <<.LabelMatchers>> / <<.GroupBy>> templates

    def promql(self, namespace: str, pods: list[str]) -> str:
        """The query the adapter sends for ``pods`` of ``namespace`` (an HPA ``Pods`` metric): its templates
        expanded as prometheus-adapter does (pkg/naming/metrics_query.go)."""
        series = self.series_query.split("{", 1)[0]
        matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
        return (
            self.metrics_query.replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "pod")
        )


def keda_trigger(rendered: tuple[Manifest, ...]) -> Manifest:
    (trigger,) = one(rendered, "ScaledObject")["spec"]["triggers"]
    return dict(trigger)


def adapter_rule(rendered: tuple[Manifest, ...]) -> AdapterRule:
    config = yaml.safe_load(one(rendered, "ConfigMap", "aoi-inspect-prometheus-adapter")["data"]["config.yaml"])
    (rule,) = config["rules"]
    return AdapterRule(rule["seriesQuery"], rule["name"]["as"], rule["metricsQuery"])
