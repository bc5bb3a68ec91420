"""Deployment manifests (deploy/): validated, never run here.

Every Kubernetes object in deploy/k8s is checked against the Kubernetes OpenAPI schema of one release
(kubernetes-validate bundles the schemas, so this works offline), in strict mode: a misspelled or
misplaced field fails. Then the links between the objects are checked (probe paths and ports, the Secret
the Deployment reads, the selectors of Service, PDB and HPA, the grace period against the launcher's
drain) against the launcher's own defaults where it has them. There is no Docker and no cluster on the
machines these tests run on: the Dockerfiles are checked structurally (instruction order, user, ports,
command lines parsed by embedline's own argument parsers), not built.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")  # the `dev` extra

from embedline.cli import VERBS  # noqa: E402
from embedline.wire import DEFAULT_PORTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# Releases whose schemas kubernetes-validate (>= 1.37) bundles: an older one still common on clusters and the
# newest bundled. Every API version the manifests use (apps/v1, v1, policy/v1, autoscaling/v2) is GA in both.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Files in deploy/k8s that are not Kubernetes objects for `kubectl apply -k`, or must not be applied by it.
KUSTOMIZATION = "kustomization.yaml"
NOT_IN_KUSTOMIZATION = {
    "secret.example.yaml": "applying it would overwrite the real key with the placeholder",
    "prometheus-adapter-rules.yaml": "configures the Prometheus Adapter, in its own namespace",
}
HEALTH_READY = "/v2/health/ready"
HEALTH_LIVE = "/v2/health/live"
SERVER_KILL_SLACK_S = 10  # TritonServer.stop(): killed 10 s past --exit-timeout-secs


# ---------------------------------------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml") and p.name != KUSTOMIZATION)


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_objects() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in manifest_files() for doc in load_documents(path)]


def the_one(kind: str) -> dict:
    found = [doc for _, doc in all_objects() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment() -> dict:
    return the_one("Deployment")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def verb_parser(verb: str) -> argparse.ArgumentParser:
    """The argument parser `embedline VERB` uses (embedline/cli.py: module.configure)."""
    parser = argparse.ArgumentParser(prog=f"embedline {verb}")
    importlib.import_module(VERBS[verb][0]).configure(parser)
    return parser


def parse_embedline(argv: list[str]) -> argparse.Namespace:
    assert argv[0] == "embedline", argv
    return verb_parser(argv[1]).parse_args(argv[2:])


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comment lines dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def index_of(instructions, keyword: str, pattern: str) -> int:
    hits = [i for i, (k, rest) in enumerate(instructions) if k == keyword and re.search(pattern, rest)]
    assert hits, f"no {keyword} matching {pattern!r}"
    return hits[0]


# --------------------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_schema_version_is_bundled(version):
    from kubernetes_validate import utils

    assert version in utils.all_versions()
    used = kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, version, strict=True)
    assert used == version.rsplit(".", 1)[0]  # that release's schema, not the nearest older one


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("bad, why", [
    ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
      "spec": {"replicas": "two", "selector": {}, "template": {}}}, "a string where an integer belongs"),
    ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
      "spec": {"ports": [{"port": 80}], "selectr": {"a": "b"}}}, "a misspelled field (strict mode)"),
])
def test_the_validator_rejects_broken_objects(bad, why, version):
    """Guards against a validator that accepts anything."""
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def test_every_manifest_file_holds_objects():
    files = manifest_files()
    assert {p.name for p in files} >= {"deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml",
                                       *NOT_IN_KUSTOMIZATION}
    for path in files:
        docs = load_documents(path)
        assert docs, f"{path.name} holds no object"
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name}: not a Kubernetes object"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("filename, obj", all_objects(),
                         ids=[f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in all_objects()])
def test_manifest_is_valid_against_the_kubernetes_schema(filename, obj, version):
    # strict: unknown fields fail too. A kind without a bundled schema raises SchemaNotFoundError.
    assert kubernetes_validate.validate(obj, version, strict=True) == version.rsplit(".", 1)[0]


def test_kustomization_lists_every_manifest_but_the_template_and_the_adapter_rules(deployment):
    kustomization = yaml.safe_load((K8S / KUSTOMIZATION).read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists a missing file {name}"
    assert set(listed) == {p.name for p in manifest_files()} - set(NOT_IN_KUSTOMIZATION)
    image_name = deployment["spec"]["template"]["spec"]["containers"][0]["image"].split(":")[0]
    assert [entry["name"] for entry in kustomization.get("images", [])] == [image_name]


# ---------------------------------------------------------------------------------------- Deployment


def test_deployment_runs_two_replicas_of_a_two_cpu_pod(deployment, container):
    assert deployment["spec"]["replicas"] == 2
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "2"
    assert resources["limits"]["memory"] and resources["requests"]["memory"]
    # Engine threads sized to the node's cores would run against a 2-CPU quota: instances x threads = the limit.
    args = parse_embedline(container["args"])
    assert args.instances * args.threads == int(resources["limits"]["cpu"])


def _mebibytes(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    return int(float(quantity[:-2]) * units[quantity[-2:]])


def test_deployment_memory_follows_the_soak_measurement(container):
    """The limit holds what `serve` plans for the pod's layout on any engine (it refuses to start below it),
    and the request is at least what the server reached under the shape soak."""
    from embedline.serving.memory import SOAK_SERVER_PEAK_MIB, memory_plan

    resources = container["resources"]
    args = parse_embedline(container["args"])
    worst = max(memory_plan([variant], args.instances).need_mib for variant in ("openvino", "int8"))
    assert _mebibytes(resources["limits"]["memory"]) >= worst
    assert _mebibytes(resources["requests"]["memory"]) >= max(SOAK_SERVER_PEAK_MIB.values())


def test_deployment_serves_on_all_interfaces_with_the_key_from_the_environment(container):
    args = parse_embedline(container["args"])
    assert args.host == "0.0.0.0"
    assert args.api_key_file is None and not args.insecure  # the key comes from EMBEDLINE_API_KEY
    from embedline.serving import launcher

    env = {entry["name"]: entry for entry in container["env"]}
    assert launcher.API_KEY_ENV in env


def test_deployment_ports_are_the_launchers_defaults_and_named(container):
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == DEFAULT_PORTS
    args = parse_embedline(container["args"])
    assert (args.http_port, args.grpc_port, args.metrics_port, args.openai_port) == (8000, 8001, 8002, 8080)


def resolve_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return {p["name"]: p["containerPort"] for p in container["ports"]}[port]


@pytest.mark.parametrize("probe, path", [
    ("startupProbe", HEALTH_READY), ("readinessProbe", HEALTH_READY), ("livenessProbe", HEALTH_LIVE),
])
def test_probes_use_tritons_http_health_endpoints(container, probe, path):
    spec = container[probe]
    assert spec["httpGet"]["path"] == path
    assert resolve_port(container, spec["httpGet"]["port"]) == DEFAULT_PORTS["http"]
    assert "httpHeaders" not in spec["httpGet"]  # health is open without the API key


def test_liveness_outlasts_the_launchers_own_restarts(container):
    """Kubernetes should restart the container only when the launcher could not bring Triton back."""
    from embedline.serving import launcher

    live = container["livenessProbe"]
    backoff = sum(min(launcher.MAX_RESTART_BACKOFF_S, launcher.RESTART_BACKOFF_S * 2 ** k) for k in range(3))
    assert live["periodSeconds"] * live["failureThreshold"] > backoff + 30  # three restarts + a start
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_grace_period_exceeds_the_drain(deployment, container):
    drain = parse_embedline(container["args"]).drain_timeout
    assert drain == verb_parser("serve").get_default("drain_timeout") == 30
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop_s + drain + SERVER_KILL_SLACK_S


def test_pod_runs_as_the_images_non_root_user(deployment, container):
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] != 0
    assert str(pod["runAsUser"]) == dockerfile_user(DEPLOY / "Dockerfile").split(":")[0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    if container["securityContext"].get("readOnlyRootFilesystem"):
        # Where the launcher and tritonserver (TMPDIR), the python backend (/dev/shm) and ONNX Runtime
        # ($XDG_CACHE_HOME) write; measured by running `embedline serve` and listing the files it wrote.
        assert {"/tmp", "/dev/shm"} <= mounts
        env = {entry["name"]: entry.get("value") for entry in container["env"]}
        assert env["XDG_CACHE_HOME"].startswith("/tmp/")


def test_secret_template_matches_what_the_deployment_reads(container):
    secret = the_one("Secret")
    ref = {entry["name"]: entry for entry in container["env"]}["EMBEDLINE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})
    assert ref.get("optional") is not True  # no key, no pod: never serve 0.0.0.0 unguarded


def test_the_secret_placeholder_is_refused_by_the_launcher(monkeypatch):
    """An accidentally applied template must not leave pods serving with a published key."""
    from embedline.serving import launcher
    from embedline.serving.triton import ServingError

    placeholder = next(iter(the_one("Secret")["stringData"].values()))
    monkeypatch.setenv(launcher.API_KEY_ENV, placeholder)
    with pytest.raises(ServingError, match="without spaces"):
        launcher.read_api_key(None)


# ------------------------------------------------------------------------------ Service, PDB and HPA


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def test_deployment_selector_matches_its_pod_labels(deployment):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)


def test_service_selects_the_pods_and_names_the_four_ports(deployment, container):
    service = the_one("Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selects(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(ports) == {"http", "grpc", "metrics", "openai"}
    for name, port in ports.items():
        assert port["port"] == DEFAULT_PORTS[name]
        assert resolve_port(container, port["targetPort"]) == DEFAULT_PORTS[name]


def test_pdb_keeps_one_pod_of_the_deployment(deployment):
    pdb = the_one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert selects(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])


def adapter_rules() -> list[dict]:
    config_map = the_one("ConfigMap")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def test_hpa_scales_the_deployment_on_the_adapters_queue_time_metric(deployment):
    hpa = the_one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], "Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert metric["pods"]["metric"]["name"] in served


def test_adapter_rule_divides_queue_time_by_successful_requests_per_pod():
    [rule] = adapter_rules()
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    numerator, _, denominator = rule["metricsQuery"].partition("/")
    assert "rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}" in numerator
    assert "rate(nv_inference_request_success{<<.LabelMatchers>>}" in denominator
    assert rule["metricsQuery"].count("by (<<.GroupBy>>)") == 2


def test_pods_are_scraped_on_the_metrics_port(deployment):
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == DEFAULT_PORTS["metrics"]


# ----------------------------------------------------------------------------- Dockerfiles (not built)


def dockerfile_user(path: Path) -> str:
    users = [rest for keyword, rest in dockerfile(path) if keyword == "USER"]
    assert users, f"{path}: no USER"
    return users[-1]


def json_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def test_cpu_image_installs_cpu_torch_before_the_project():
    steps = dockerfile(DEPLOY / "Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")
    torch = index_of(steps, "RUN", r"pip install torch==")
    project = index_of(steps, "RUN", r"pip install '\.\[serve,search,export\]'")
    assert torch < project
    torch_words = shlex.split(steps[torch][1])
    assert "https://download.pytorch.org/whl/cpu" in torch_words
    makefile_torch = re.search(r"^TORCH_SPEC \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert makefile_torch in torch_words  # the version the project is tested with
    assert {"serve", "export"} <= set(metadata.metadata("embedline").get_all("Provides-Extra"))


def test_cpu_image_prepares_the_default_model_at_build_time():
    steps = dockerfile(DEPLOY / "Dockerfile")
    env = " ".join(rest for keyword, rest in steps if keyword == "ENV")
    assert re.search(r"EMBEDLINE_HOME=/\S+", env)
    prepare = index_of(steps, "RUN", r"prepare_artifact\(None\)")
    assert index_of(steps, "RUN", r"pip install '\.\[serve,search,export\]'") < prepare
    code = shlex.split(steps[prepare][1])[2]  # python -c CODE
    compile(code, "prepare", "exec")
    from embedline.serving.launcher import prepare_artifact  # the function the build step calls

    assert callable(prepare_artifact)
    assert prepare < index_of(steps, "USER", r".")  # prepared as root, read by the runtime user


def test_cpu_image_runs_embedline_serve_as_a_non_root_user():
    steps = dockerfile(DEPLOY / "Dockerfile")
    user = dockerfile_user(DEPLOY / "Dockerfile")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes' runAsNonRoot can check it
    [cmd] = [json_form(rest) for keyword, rest in steps if keyword == "CMD"]
    assert cmd == ["embedline", "serve", "--host", "0.0.0.0"]
    args = parse_embedline(cmd)
    assert args.host == "0.0.0.0" and args.api_key_file is None and not args.insecure
    from embedline.serving.launcher import check_exposure
    from embedline.serving.triton import ServingError

    with pytest.raises(ServingError):  # so the container needs EMBEDLINE_API_KEY (or fails at once)
        check_exposure(args.host, None, args.insecure)
    check_exposure(args.host, "a-key", args.insecure)
    [expose] = [rest.split() for keyword, rest in steps if keyword == "EXPOSE"]
    assert sorted(map(int, expose)) == sorted(DEFAULT_PORTS.values())


def test_the_deployment_runs_the_images_command_with_more_flags(container):
    steps = dockerfile(DEPLOY / "Dockerfile")
    [cmd] = [json_form(rest) for keyword, rest in steps if keyword == "CMD"]
    assert container["args"][:len(cmd)] == cmd
    assert "command" not in container  # the image's ENTRYPOINT (tini) stays


def test_cpu_image_healthcheck_asks_triton_for_readiness():
    steps = dockerfile(DEPLOY / "Dockerfile")
    [check] = [rest for keyword, rest in steps if keyword == "HEALTHCHECK"]
    options, _, command = check.partition(" CMD ")
    argv = json_form(command)
    assert argv[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{DEFAULT_PORTS['http']}{HEALTH_READY}" in argv[2]
    compile(argv[2], "healthcheck", "exec")
    assert "--start-period=" in options


def test_cpu_image_build_context_leaves_out_the_venv_and_git():
    ignored = {line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git"} <= ignored
    for needed in ("pyproject.toml", "README.md", "embedline", "serving", "model_repository"):
        assert needed not in ignored and (ROOT / needed).exists()


def test_gpu_image_is_stock_triton_with_the_python_models_packages():
    steps = dockerfile(DEPLOY / "triton-gpu" / "Dockerfile")
    assert steps[0] == ("FROM", "nvcr.io/nvidia/tritonserver:24.10-py3")
    pip = steps[index_of(steps, "RUN", r"pip install")][1]
    for package in ("tokenizers", "onnxruntime", "numpy"):
        assert re.search(rf"\b{package}\b", pip), package
    assert "onnxruntime-gpu" not in pip  # the head runs on CPU; CUDA is Triton's own onnxruntime backend
    assert index_of(steps, "COPY", r"^\. /models$")
    [cmd] = [json_form(rest) for keyword, rest in steps if keyword == "CMD"]
    assert cmd == ["tritonserver", "--model-repository=/models"]


def test_gpu_readme_builds_the_onnxruntime_fp16_repository_the_image_copies():
    text = (DEPLOY / "triton-gpu" / "README.md").read_text()
    [build_repo] = [line for line in text.splitlines() if line.startswith("embedline build-repo")]
    args = parse_embedline(shlex.split(build_repo))
    assert (args.layout, args.device, args.variant) == ("onnxruntime", "gpu", "fp16")
    [docker_build] = [line for line in text.splitlines() if line.startswith("docker build")]
    words = shlex.split(docker_build.split("#")[0])
    assert words[words.index("-f") + 1] == "deploy/triton-gpu/Dockerfile"
    assert words[-1] == args.output  # the build context is the repository build-repo wrote
