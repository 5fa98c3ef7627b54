"""The KubeRay manifests and the Dockerfile in cluster/, checked without a Kubernetes cluster.

Each RayCluster / RayJob is validated against the OpenAPI v3 schema of the KubeRay v1.7.0 CRD
(tests/kuberay_crds/) with jsonschema, the way `kubectl apply` (strict field validation) and
the API server would: unknown fields, wrong types, missing required fields and out-of-range
int32/int64 are errors. Not checked: the CEL rules (`x-kubernetes-validations`) and the
operator's own checks. Then the security properties the manifests promise are asserted.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from sfl_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFESTS = {"RayCluster": KUBERAY / "raycluster.yaml", "RayJob": KUBERAY / "rayjob.yaml"}
SECRET_NAME, SECRET_KEY = "sfl-ray-auth", "auth_token"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2.3 MB of YAML


# ---------------------------------------------------------------- schema as the API server reads it

def _strict(node: Any) -> Any:
    """The CRD schema for Draft 7: objects with declared properties refuse other fields (the
    API server prunes or, under strict validation, rejects them), `nullable` admits null,
    int-or-string admits both, and the `x-kubernetes-*` extensions are dropped."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k.startswith("x-kubernetes-"):
            continue
        if k == "properties":  # a map of field names, not a schema
            out[k] = {name: _strict(sub) for name, sub in v.items()}
        else:
            out[k] = v if k in ("enum", "default", "required") else _strict(v)
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    return out


@functools.cache
def schema(kind: str) -> dict:
    crd = yaml.load((REPO / "tests" / "kuberay_crds" / CRDS[kind]).read_text(), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    for name, bits in (("int32", 32), ("int64", 64)):
        checker.checks(name)(lambda v, b=bits: not isinstance(v, int) or -(2 ** (b - 1)) <= v < 2 ** (b - 1))
    return checker


def errors(doc: dict) -> list[jsonschema.ValidationError]:
    """Schema errors of a manifest (its kind picks the CRD; the group/version must be ray.io/v1)."""
    assert doc["apiVersion"] == "ray.io/v1"
    validator = jsonschema.Draft7Validator(schema(doc["kind"]), format_checker=_format_checker())
    return sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))


def manifest(kind: str) -> dict:
    # Through JSON: YAML aliases (&anchor/*alias) become separate copies, as kubectl sends them.
    return json.loads(json.dumps(yaml.safe_load(MANIFESTS[kind].read_text())))


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def containers(doc: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod spec, container) for every container the manifest defines."""
    spec = cluster_spec(doc)
    templates = [("head", spec["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob":
        templates.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    for where, template in templates:
        pod = template["spec"]
        for c in pod["containers"]:
            yield where, pod, c


def test_vendored_crds_are_the_upstream_files_named_in_their_readme():
    readme = (REPO / "tests" / "kuberay_crds" / "README.md").read_text()
    for name in CRDS.values():
        digest = hashlib.sha256((REPO / "tests" / "kuberay_crds" / name).read_bytes()).hexdigest()
        assert f"| `{name}` | `{digest}` |" in readme


# ---------------------------------------------------------------- the check accepts ours...

@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_matches_the_kuberay_v1_7_schema(kind):
    doc = manifest(kind)
    assert doc["kind"] == kind
    assert [e.message for e in errors(doc)] == []


# ---------------------------------------------------------------- ...and bites on broken ones

def _first_worker(doc: dict) -> dict:
    return cluster_spec(doc)["workerGroupSpecs"][0]


def _break_unknown_field(doc: dict) -> None:
    _first_worker(doc)["replica"] = 1  # a typo of replicas


def _break_unknown_container_field(doc: dict) -> None:
    cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["imagee"] = "x"


def _break_type(doc: dict) -> None:
    _first_worker(doc)["replicas"] = "two"


def _break_start_param_type(doc: dict) -> None:
    cluster_spec(doc)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string


def _break_int32_range(doc: dict) -> None:
    _first_worker(doc)["maxReplicas"] = 2 ** 31


def _break_missing_group_name(doc: dict) -> None:
    del _first_worker(doc)["groupName"]


def _break_missing_container_name(doc: dict) -> None:
    del cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]


def _break_missing_secret_key(doc: dict) -> None:
    env = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    del next(e for e in env if e["name"] == "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]["key"]


def _break_enum(doc: dict) -> None:
    cluster_spec(doc)["authOptions"]["mode"] = "tokens"


BREAKS = {
    "unknown field": (_break_unknown_field, "Additional properties", "replica"),
    "unknown container field": (_break_unknown_container_field, "Additional properties", "imagee"),
    "wrong type": (_break_type, "is not of type 'integer'", "replicas"),
    "rayStartParams value not a string": (_break_start_param_type, "is not of type 'string'", "num-cpus"),
    "int32 out of range": (_break_int32_range, "is not a 'int32'", "maxReplicas"),
    "missing groupName": (_break_missing_group_name, "'groupName' is a required property", None),
    "missing container name": (_break_missing_container_name, "'name' is a required property", None),
    "missing secretKeyRef key": (_break_missing_secret_key, "'key' is a required property", None),
    "bad enum": (_break_enum, "is not one of", "mode"),
}


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
@pytest.mark.parametrize("name", sorted(BREAKS))
def test_schema_check_rejects_a_broken_manifest(kind, name):
    breaker, message, field = BREAKS[name]
    doc = copy.deepcopy(manifest(kind))
    breaker(doc)
    found = errors(doc)
    assert len(found) == 1, [e.message for e in found]
    assert message in found[0].message
    if field is not None:  # the error names the broken field (in its path or its message)
        assert field in list(found[0].absolute_path) or repr(field) in found[0].message


def test_missing_top_level_required_fields_are_caught():
    cluster = copy.deepcopy(manifest("RayCluster"))
    del cluster["spec"]["headGroupSpec"]
    assert ["'headGroupSpec' is a required property"] == [e.message for e in errors(cluster)]
    job = copy.deepcopy(manifest("RayJob"))
    job["spec"]["shutdownAfterJobFinished"] = True  # the real field ends in "Finishes"
    assert [list(e.absolute_path) for e in errors(job)] == [["spec"]]


# ---------------------------------------------------------------- security properties

@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_token_comes_from_the_secret_and_auth_mode_is_token(kind):
    doc = manifest(kind)
    seen = []
    for where, _, c in containers(doc):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"].get("value") == "token", where
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, f"{where}: a literal RAY_AUTH_TOKEN"
        assert token["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": SECRET_KEY}, where
        for name, e in env.items():  # nothing secret-looking is written out in the manifest
            if re.search(r"TOKEN|SECRET|PASSWORD|KEY", name):
                assert "value" not in e, f"{where}: {name} has a literal value"
        seen.append(where)
    assert "head" in seen and len(seen) >= 3
    # the operator reads the same Secret (RayJob status calls, containers it injects)
    assert cluster_spec(doc)["authOptions"] == {"mode": "token", "secretName": SECRET_NAME}


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("*.yaml")))
def test_no_secret_is_written_in_the_manifests(path):
    text = path.read_text()
    docs = list(yaml.safe_load_all(text))
    assert all(d.get("kind") != "Secret" for d in docs)
    assert not re.search(r"\b[0-9a-fA-F]{32,}\b|\b[A-Za-z0-9+/]{40,}={0,2}", text)
    commented = [line for line in text.splitlines() if "kubectl create secret" in line]
    if path.name in ("raycluster.yaml", "rayjob.yaml"):  # the how-to is there, with a generated token
        assert commented and all(line.lstrip().startswith("#") and "$(openssl rand" in line for line in commented)


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_dashboard_and_gcs_stay_inside_the_cluster(kind):
    doc = manifest(kind)
    head = cluster_spec(doc)["headGroupSpec"]
    host = head["rayStartParams"]["dashboard-host"]
    assert host not in ("0.0.0.0", "::", "") and host in ("127.0.0.1", "$(MY_POD_IP)")
    if host == "$(MY_POD_IP)":  # Kubernetes substitutes only variables the container defines
        (c,) = head["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["MY_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    (c,) = head["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"gcs-server": 6379, "dashboard": 8265}


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_pods_run_as_non_root_without_privilege_escalation(kind):
    for where, pod, c in containers(manifest(kind)):
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, where
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_gpu_groups_whole_gpus_for_servers_and_custom_resources(kind):
    groups = {g["groupName"]: g for g in cluster_spec(manifest(kind))["workerGroupSpecs"]}
    assert set(groups) == {"server-gpu", "client-pools"}
    assert groups["server-gpu"]["resources"] == {"server_block": "1"}
    assert "client_pool" in groups["client-pools"]["resources"]
    for g in groups.values():
        (c,) = g["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["resources"]["requests"] == c["resources"]["limits"]


# ---------------------------------------------------------------- the RayJob runs what it says

def test_rayjob_entrypoint_is_a_valid_sfl_ray_run_writing_to_the_shared_volume():
    spec = manifest("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "sfl_ray.run", "--config"]
    image_config = Path(argv[4])
    assert image_config.is_relative_to("/home/ray/app")  # the Dockerfile's WORKDIR
    local_config = REPO / image_config.relative_to("/home/ray/app")
    sets = [argv[i + 1] for i in range(5, len(argv), 2) if argv[i] == "--set"]
    assert len(sets) * 2 == len(argv) - 5
    cfg = load_config(str(local_config), sets)  # a typo in a key would raise here
    assert cfg.output.dir == "/mnt/runs"
    assert cfg.cluster.storage_path.startswith("/mnt/runs/")
    # every pod mounts the ReadWriteMany claim at /mnt/runs
    (pvc,) = yaml.safe_load_all((KUBERAY / "storage.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, pod, c in containers(manifest("RayJob")):
        if where == "submitter":
            continue
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert claims[mounts["/mnt/runs"]] == pvc["metadata"]["name"], where


# ---------------------------------------------------------------- the Dockerfile

def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of cluster/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "cluster" / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_has_cpu_and_cuda_variants_and_installs_the_package():
    steps = _dockerfile()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for i, a in steps if i == "ARG"}
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE=")  # BASE is known before FROM
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-cpu", args["BASE"])
    assert [a for i, a in steps if i == "FROM"] == ["${BASE}"]
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert '--index-url "$TORCH_INDEX"' in runs and "pip install --no-cache-dir ." in runs
    for i, a in steps:  # what it copies exists
        if i == "COPY":
            for src in [w for w in a.split() if not w.startswith("--")][:-1]:
                assert (REPO / src).exists(), src
    # the CUDA build is documented with the same Ray version as the CPU default
    text = (REPO / "cluster" / "Dockerfile").read_text()
    version = re.search(r"ray:(\d+\.\d+\.\d+)", args["BASE"]).group(1)
    assert f"BASE=rayproject/ray:{version}-py311-gpu" in text
    for kind in MANIFESTS:  # and the manifests run that Ray version
        assert cluster_spec(manifest(kind))["rayVersion"] == version


def test_dockerfile_runs_as_non_root_and_bakes_in_no_secret():
    steps = _dockerfile()
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for i, a in steps:
        if i in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|CREDENTIAL|_KEY", a.split("=")[0], re.I), a
        assert "auth_token" not in a and ".ray/" not in a, a  # no token file copied in
