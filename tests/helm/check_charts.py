#!/usr/bin/env python3
"""Offline checks of the Helm charts in helm/, run by tests/tests/helm.rs.

For each chart, with its default values and with a non-default values file:
  * `helm lint --strict` (Helm 4's own linter, through helm-python-sdk);
  * `helm template` (the same engine), which also checks values.schema.json;
  * every rendered built-in object against the Kubernetes JSON schemas bundled in
    kubernetes-validate, strict (an unknown field is an error);
  * every Trellis resource (group trellis.dev) against the openAPIV3Schema of our own
    CRDs, made strict the way `kubectl apply --validate=strict` is;
  * no object rendered twice, every namespaced object in the namespace it should be.
Then the negative cases: a values file with a typo must be refused by both lint and
render, and a known-bad object must be refused by each validator, so a check that
silently stopped checking is caught.

Usage:
  check_charts.py --repo ROOT [--emit DIR]
      all of the above; --emit writes each chart's renderings (CRDs included) as JSON
      lists of objects to DIR/<chart>.json (defaults) and DIR/<chart>-custom.json.
  check_charts.py --repo ROOT --chart NAME --values FILE
      lint, render and validate one chart with one values file only.
  check_charts.py --repo ROOT --install-output FILE [--namespace NS] [--image-tag TAG]
      validate `trellisctl install`'s output and compare it, object by object, with
      `helm template trellis helm/trellis --include-crds` of the same settings.

Exit status 0 when everything holds, 1 with one line per problem on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import re
import sys
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import yaml

TRELLIS_GROUP = "trellis.dev"

# How each chart is rendered: release name and the namespace it is installed in.
CHARTS = {
    "trellis": {"release": "trellis", "namespace": "trellis-system", "custom": "values-trellis.yaml"},
    "marketplace": {"release": "marketplace", "namespace": "marketplace", "custom": "values-marketplace.yaml"},
}

# Cluster-scoped kinds the charts render; everything else must carry a namespace.
CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "MeshConfig",
    "MutatingWebhookConfiguration",
    "Namespace",
}


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (only true/false): how serde_yaml reads crds/examples/."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$"), list("tf"))


class Problems:
    """Collects failures so one run reports all of them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.lines.append(f"{where}: {message.strip()}")

    def __bool__(self) -> bool:
        return bool(self.lines)


def kube_version() -> str:
    """The newest Kubernetes version whose schemas the pinned kubernetes-validate bundles."""
    return kubernetes_validate.latest_version()


def object_name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name", "<no name>")
    return f"{obj.get('kind', '<no kind>')} {ns + '/' if ns else ''}{name}"


def object_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return "/".join(
        [obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace") or "", meta.get("name", "")]
    )


def load_values(path: pathlib.Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    values = yaml.safe_load(path.read_text())
    return values or {}


def lint(chart_dir: pathlib.Path, values: dict[str, Any] | None, namespace: str) -> list[str]:
    """`helm lint --strict`: errors and warnings (severity >= 2) are failures."""
    report = helm_python.lint(chart_dir, values, strict=True, namespace=namespace)
    found = [f"{m.get('path', '')}: {m.get('error', '')}" for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    found += [e for e in report.get("errors", []) if not any(e.strip() in f for f in found)]
    return found


def render(chart_dir: pathlib.Path, values: dict[str, Any] | None, release: str, namespace: str) -> list[tuple[str, dict[str, Any]]]:
    """`helm template --include-crds`: (source file, object) for every rendered object."""
    with helm_python.Chart.load(chart_dir) as chart:
        manifests = chart.render(values, name=release, namespace=namespace)
        crds = chart.crds
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                objects.append((path, doc))
    for crd in crds:
        for doc in yaml.safe_load_all(crd["data"]):
            if doc is not None:
                objects.append((crd.get("filename") or crd.get("name", "crds/"), doc))
    return objects


def strict_schema(schema: Any) -> Any:
    """A CRD schema in which an object that lists its properties accepts no others,
    as the API server's strict field validation does (it would otherwise prune them)."""
    if isinstance(schema, dict):
        schema = {k: strict_schema(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


def crd_validators(repo: pathlib.Path) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> validator for every version of our CRDs, from the chart."""
    validators = {}
    with helm_python.Chart.load(repo / "helm" / "trellis") as chart:
        crds = chart.crds
    for crd in crds:
        for doc in yaml.safe_load_all(crd["data"]):
            if not doc:
                continue
            group = doc["spec"]["group"]
            kind = doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                schema = strict_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                # The API server owns these; the CRD schema does not describe them.
                schema.setdefault("properties", {}).update(
                    {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
                )
                schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def validate(obj: dict[str, Any], validators: dict, version: str) -> list[str]:
    """Every problem with one object, as `field.path: message`."""
    api_version = obj.get("apiVersion", "")
    if api_version.split("/")[0] == TRELLIS_GROUP:
        validator = validators.get((api_version, obj.get("kind")))
        if validator is None:
            return [f"no CRD in helm/trellis/crds/ defines {api_version} {obj.get('kind')}"]
        return [
            f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
        ]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message} (Kubernetes {e.version} schema)"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def non_string_keys(value: Any, path: str = "") -> list[str]:
    """Keys that Kubernetes' YAML parser (YAML 1.1, like PyYAML's safe loader) does not
    read as strings: an unquoted `on:` or `yes:` becomes the key "true" in the API."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                found.append(f"{here}: the key is read as {key!r}, not a string, by Kubernetes' YAML parser: quote it")
            found += non_string_keys(item, here)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += non_string_keys(item, f"{path}.{index}")
    return found


def check_objects(where: str, objects, validators, version: str, namespace: str | None) -> tuple[Problems, int]:
    problems = Problems()
    seen: dict[str, str] = {}
    for source, obj in objects:
        if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
            problems.add(f"{where} {source}", "a document that is not a Kubernetes object")
            continue
        name = object_name(obj)
        key = object_key(obj)
        if key in seen:
            problems.add(f"{where} {name}", f"rendered twice ({seen[key]} and {source})")
        seen[key] = source
        meta_ns = (obj.get("metadata") or {}).get("namespace")
        if obj["kind"] in CLUSTER_SCOPED and meta_ns:
            problems.add(f"{where} {name}", "a cluster-scoped object with a namespace")
        if obj["kind"] not in CLUSTER_SCOPED:
            if not meta_ns:
                problems.add(f"{where} {name}", "a namespaced object without metadata.namespace")
            elif namespace is not None and meta_ns != namespace:
                problems.add(f"{where} {name}", f"in namespace {meta_ns}, expected {namespace}")
        for problem in non_string_keys(obj) + validate(obj, validators, version):
            problems.add(f"{where} {name} ({source})", problem)
    return problems, len(objects)


def check_chart(repo: pathlib.Path, chart: str, values_file: pathlib.Path | None, validators, version: str) -> tuple[Problems, list]:
    settings = CHARTS[chart]
    chart_dir = repo / "helm" / chart
    label = f"helm/{chart} ({values_file.name if values_file else 'default values'})"
    problems = Problems()
    values = load_values(values_file)
    for finding in lint(chart_dir, values, settings["namespace"]):
        problems.add(f"{label} helm lint --strict", finding)
    try:
        objects = render(chart_dir, values, settings["release"], settings["namespace"])
    except helm_python.HelmError as e:
        problems.add(f"{label} helm template", str(e))
        return problems, []
    # The marketplace puts its objects in the namespace its values name, not the release's.
    expected_ns = (values or {}).get("namespace", "marketplace") if chart == "marketplace" else settings["namespace"]
    found, count = check_objects(label, objects, validators, version, expected_ns)
    problems.lines += found.lines
    if not problems:
        kinds = sorted({o["kind"] for _, o in objects})
        print(f"ok {label}: lint clean, {count} objects valid ({', '.join(kinds)})")
    return problems, [o for _, o in objects]


def check_examples_match(repo: pathlib.Path, rendered: list) -> Problems:
    """The marketplace chart's mesh resources, rendered with the defaults, are the
    resources of crds/examples/marketplace/ (labels aside)."""
    problems = Problems()
    want = {}
    for path in sorted((repo / "crds" / "examples" / "marketplace").glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=Yaml12Loader):
            if doc:
                want[object_key(doc)] = (path.name, doc)
    have = {}
    for obj in rendered:
        if obj.get("apiVersion", "").startswith(TRELLIS_GROUP + "/"):
            obj = copy.deepcopy(obj)
            obj.get("metadata", {}).pop("labels", None)
            have[object_key(obj)] = obj
    for key, (file, doc) in want.items():
        if key not in have:
            problems.add("helm/marketplace", f"{object_name(doc)} of crds/examples/marketplace/{file} is not in the chart")
        elif have[key] != doc:
            problems.add(
                "helm/marketplace",
                f"{object_name(doc)} differs from crds/examples/marketplace/{file}: "
                f"chart {json.dumps(have[key], sort_keys=True)} vs example {json.dumps(doc, sort_keys=True)}",
            )
    for key, obj in have.items():
        if key not in want:
            problems.add("helm/marketplace", f"{object_name(obj)} is in the chart but not in crds/examples/marketplace/")
    return problems


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """Where two JSON values first differ, for a message a person can act on."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            here = f"{path}.{key}" if path else str(key)
            if key not in a:
                return f"{here}: only in helm template ({json.dumps(b[key])[:200]})"
            if key not in b:
                return f"{here}: only in trellisctl install ({json.dumps(a[key])[:200]})"
            if a[key] != b[key]:
                return first_difference(a[key], b[key], here)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items in trellisctl install, {len(b)} in helm template"
        for index, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}.{index}")
    return f"{path or '<root>'}: trellisctl install has {json.dumps(a)[:200]}, helm template {json.dumps(b)[:200]}"


def check_install_output(repo: pathlib.Path, file: pathlib.Path, namespace: str, image_tag: str | None, validators, version: str) -> Problems:
    label = f"trellisctl install ({file.name})"
    installed = [("trellisctl install", doc) for doc in yaml.safe_load_all(file.read_text()) if doc is not None]
    problems, count = check_objects(label, installed, validators, version, namespace)
    values = None
    if image_tag:
        values = {"controlPlane": {"image": {"tag": image_tag}}, "proxy": {"image": {"tag": image_tag}}}
    rendered = render(repo / "helm" / "trellis", values, "trellis", namespace)
    have = {object_key(o): o for _, o in installed}
    want = {object_key(o): o for _, o in rendered}
    for key in sorted(set(have) | set(want)):
        if key not in have:
            problems.add(label, f"{object_name(want[key])} is rendered by helm template but missing")
        elif key not in want:
            problems.add(label, f"{object_name(have[key])} is not rendered by helm template")
        elif have[key] != want[key]:
            problems.add(f"{label} {object_name(have[key])}", first_difference(have[key], want[key]))
    if not problems:
        print(f"ok {label}: {count} objects valid, the same objects as helm template renders")
    return problems


def check_negative_cases(repo: pathlib.Path, validators, version: str) -> Problems:
    """Each check must be able to fail: feed it what it must refuse."""
    problems = Problems()
    bad = repo / "tests" / "helm" / "bad"
    for chart, file, word in [("trellis", "trellis-typo.yaml", "replica"), ("marketplace", "marketplace-typo.yaml", "namespaces")]:
        values = load_values(bad / file)
        settings = CHARTS[chart]
        findings = lint(repo / "helm" / chart, values, settings["namespace"])
        if not any(word in f for f in findings):
            problems.add(f"negative case helm/{chart} {file}", f"helm lint --strict did not refuse the typo {word!r}: {findings}")
        try:
            render(repo / "helm" / chart, values, settings["release"], settings["namespace"])
            problems.add(f"negative case helm/{chart} {file}", "helm template rendered values with a typo")
        except helm_python.HelmValuesError as e:
            if word not in str(e):
                problems.add(f"negative case helm/{chart} {file}", f"the refusal does not name {word!r}: {e}")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x", "namespace": "default"},
        "spec": {
            "replica": 2,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "x", "image": "x"}]}},
        },
    }
    if not validate(deployment, validators, version):
        problems.add("negative case", "kubernetes-validate accepted a Deployment with the unknown field spec.replica")
    canary = {
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "x", "namespace": "default"},
        "spec": {"service": "x", "stableSubset": "v1", "canarySubset": "v2", "steps": [10, 100], "intervall": "1m"},
    }
    if not validate(canary, validators, version):
        problems.add("negative case", "the Canary CRD schema accepted the unknown field spec.intervall")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, type=pathlib.Path, help="the workspace root")
    parser.add_argument("--emit", type=pathlib.Path, help="write each chart's default rendering as JSON here")
    parser.add_argument("--chart", choices=sorted(CHARTS), help="check only this chart")
    parser.add_argument("--values", type=pathlib.Path, help="with --chart: the values file to check it with")
    parser.add_argument("--install-output", type=pathlib.Path, help="trellisctl install's output to check")
    parser.add_argument("--namespace", default="trellis-system", help="with --install-output: its --namespace")
    parser.add_argument("--image-tag", help="with --install-output: its --image-tag")
    args = parser.parse_args()
    repo = args.repo.resolve()
    version = kube_version()
    validators = crd_validators(repo)
    problems = Problems()

    if args.install_output:
        problems.lines += check_install_output(repo, args.install_output, args.namespace, args.image_tag, validators, version).lines
    elif args.chart:
        found, _ = check_chart(repo, args.chart, args.values, validators, version)
        problems.lines += found.lines
    else:
        print(f"validating against the Kubernetes {version} schemas (kubernetes-validate {kubernetes_validate.__version__}), Helm {helm_python.helm_sdk_version()}")
        for chart, settings in CHARTS.items():
            found, objects = check_chart(repo, chart, None, validators, version)
            problems.lines += found.lines
            if chart == "marketplace" and objects:
                problems.lines += check_examples_match(repo, objects).lines
            if args.emit and objects:
                args.emit.mkdir(parents=True, exist_ok=True)
                (args.emit / f"{chart}.json").write_text(json.dumps(objects, indent=1, sort_keys=True))
            found, objects = check_chart(repo, chart, repo / "tests" / "helm" / settings["custom"], validators, version)
            problems.lines += found.lines
            if args.emit and objects:
                (args.emit / f"{chart}-custom.json").write_text(json.dumps(objects, indent=1, sort_keys=True))
        problems.lines += check_negative_cases(repo, validators, version).lines

    for line in problems.lines:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
