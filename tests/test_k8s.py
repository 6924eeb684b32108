"""The Kubernetes manifests (docker/k8s/): every one validated offline against the
Kubernetes schemas (kubernetes-validate, strict: an unknown field fails), and wired to the
service: probe paths are its routes, ports its port, env names its settings, the Ingress
hashes on the header its client sends.

The manifests are read as `kubectl apply -k` reads them. Where kubectl (or kustomize) is
installed, its build is compared with the tests' own assembly of the kustomizations, so
the checks below hold for what a cluster receives."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml
from test_deploy import DOCKER, instruction, load_yaml

from service.app import create_app
from service.clients.client import SESSION_HEADER
from service.settings import Settings

K8S = DOCKER / "k8s"
VARIANTS = {"cpu": K8S, "gpu": K8S / "gpu"}
KUBERNETES = "1.33.0"  # one of the versions kubernetes-validate bundles
GPU = "nvidia.com/gpu"


# --- the kustomizations, assembled ---------------------------------------------------------


def resolve_pointer(document, path: str):
    """The parent and the last token of an RFC 6901 pointer."""
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
    for token in tokens[:-1]:
        document = document[int(token)] if isinstance(document, list) else document[token]
    return document, tokens[-1]


def json_patch(document: dict, operations: list[dict]) -> None:
    """RFC 6902's add and replace, the operations the overlays use."""
    for op in operations:
        parent, key = resolve_pointer(document, op["path"])
        if isinstance(parent, list):
            index = len(parent) if key == "-" else int(key)
            if op["op"] == "add":
                parent.insert(index, op["value"])
            else:
                assert op["op"] == "replace" and index < len(parent), op
                parent[index] = op["value"]
        else:
            assert op["op"] == "add" or (op["op"] == "replace" and key in parent), op
            parent[key] = op["value"]


def assemble(folder) -> list[dict]:
    """What kustomize builds from `folder`, for the fields these kustomizations use:
    resources (files, and folders with a kustomization of their own), namespace, JSON 6902
    patches with a target, and images (another name or tag for an image, as a cluster that
    pulls from a registry needs). Any other field fails, rather than being ignored."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert spec["kind"] == "Kustomization"
    fields = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
    assert set(spec) <= fields, spec
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        assert path.exists(), f"{folder / 'kustomization.yaml'} lists {entry}, which is missing"
        if path.is_dir():
            objects += assemble(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in spec.get("patches", []):
        target = patch["target"]
        targets = [
            o
            for o in objects
            if all(o.get(k, o["metadata"].get(k)) == v for k, v in target.items())
        ]
        assert targets, f"the patch {patch['path']} matches nothing"
        for obj in targets:
            json_patch(obj, yaml.safe_load((folder / patch["path"]).read_text()))
    for image in spec.get("images", []):
        for obj in objects:
            for main in (
                obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
            ):
                # name[:tag], where a name may hold a registry's host:port
                name, tag = main["image"], ""
                if ":" in name.rsplit("/", 1)[-1]:
                    name, tag = name.rsplit(":", 1)
                if name == image["name"]:
                    name, tag = image.get("newName", name), image.get("newTag", tag)
                    main["image"] = f"{name}:{tag}" if tag else name
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = spec["namespace"]
            else:
                obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def kustomization_files(folder) -> set:
    """Every file the kustomization at `folder` reads, its own included."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    files = {folder / "kustomization.yaml"} | {folder / p["path"] for p in spec.get("patches", [])}
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        files |= kustomization_files(path) if path.is_dir() else {path}
    return files


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return found


def container(objects: list[dict]) -> dict:
    (main,) = one(objects, "Deployment", "worldplan")["spec"]["template"]["spec"]["containers"]
    return main


def settings_of(main: dict, monkeypatch) -> Settings:
    """The Settings the container's env gives the service (Secrets left unset)."""
    for var in main["env"]:
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    return Settings()


@pytest.fixture(params=list(VARIANTS))
def objects(request) -> list[dict]:
    return assemble(VARIANTS[request.param])


# --- the files ------------------------------------------------------------------------------


def test_every_manifest_is_listed_and_valid_against_the_kubernetes_schemas(objects):
    on_disk = {p.resolve() for p in K8S.rglob("*.yaml")}
    listed = set().union(*(kustomization_files(folder) for folder in VARIANTS.values()))
    assert on_disk == listed, "manifests no kustomization lists: " + str(on_disk - listed)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert kinds >= {
        ("Namespace", "worldplan"), ("Deployment", "worldplan"), ("Service", "worldplan"),
        ("Ingress", "worldplan"), ("HorizontalPodAutoscaler", "worldplan"),
        ("StatefulSet", "redis"), ("Service", "redis"),
    }  # fmt: skip
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)  # raises where invalid
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "worldplan"


def test_the_validation_refuses_a_misspelt_field_and_a_wrong_type():
    for path, value in [("readinessprobe", {"httpGet": {"path": "/readyz", "port": 8000}}),
                        ("ports", [{"containerPort": "8000"}])]:  # fmt: skip
        objects = assemble(K8S)
        container(objects)[path] = value
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(one(objects, "Deployment"), KUBERNETES, strict=True)


def kustomize() -> list[str]:
    if found := shutil.which("kustomize"):
        return [found, "build"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    pytest.skip("neither kustomize nor kubectl is installed")


def test_kustomize_builds_what_the_tests_check():
    command = kustomize()
    for folder in VARIANTS.values():
        built = subprocess.run([*command, str(folder)], capture_output=True, text=True)
        assert built.returncode == 0, built.stderr

        def key(obj: dict) -> tuple[str, str]:
            return obj["kind"], obj["metadata"]["name"]

        theirs = sorted(yaml.safe_load_all(built.stdout), key=key)
        assert theirs == sorted(assemble(folder), key=key)


def test_an_images_entry_names_the_image_a_cluster_pulls(tmp_path):
    """docs/deploy.md: a cluster that pulls from a registry gets the image named in `images:`."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S, tmp_path)],  # kustomize: relative
                "images": [{"name": "worldplan", "newName": "registry.test/wp", "newTag": "7"}],
            }
        )
    )
    objects = assemble(tmp_path)
    assert container(objects)["image"] == "registry.test/wp:7"
    (redis,) = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert redis["image"] == "redis:7-alpine"
    if shutil.which("kustomize") or shutil.which("kubectl"):
        built = subprocess.run([*kustomize(), str(tmp_path)], capture_output=True, text=True)
        assert built.returncode == 0, built.stderr
        built_objects = list(yaml.safe_load_all(built.stdout))
        assert container(built_objects)["image"] == "registry.test/wp:7"


# --- wired to the service -------------------------------------------------------------------


def test_the_probes_and_ports_are_the_services(objects):
    main = container(objects)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    routes = set(create_app().openapi()["paths"])  # the API as the app publishes it
    probes = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in probes.items():
        get = main[probe]["httpGet"]
        assert get["path"] == path and path in routes
        assert ports[get["port"]] == 8000

    # the image's own command serves on that port, as that user
    (cmd,) = instruction("CMD")
    argv = json.loads(cmd)
    assert argv[argv.index("--port") + 1] == str(ports["http"])
    assert main["image"].split(":")[0] == "worldplan" and "command" not in main
    uid = re.search(r"--uid (\d+)", " ".join(instruction("RUN")))[1]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)

    # Service -> the container's port, Ingress -> the Service
    service = one(objects, "Service", "worldplan")
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ports
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (rule,) = one(objects, "Ingress")["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend == {"name": "worldplan", "port": {"name": port["name"]}}


def test_the_env_names_are_the_services_settings(objects, monkeypatch):
    main = container(objects)
    gpu_env = load_yaml("compose.gpu.yaml")["services"]["worldplan"]["environment"]
    for var in main["env"]:
        name = var["name"]
        assert (name.startswith("WORLDPLAN_") and name[10:].lower() in Settings.model_fields) or (
            name in gpu_env
        ), name
    settings = settings_of(main, monkeypatch)
    assert settings.session_store == "redis"
    redis_url = httpx.URL(settings.redis_url)
    redis = one(objects, "Service", "redis")
    assert redis_url.host == redis["metadata"]["name"]
    assert redis_url.port in {p["port"] for p in redis["spec"]["ports"]}

    # the key comes from a Secret that may not exist (then the service is open)
    (key,) = [v for v in main["env"] if v["name"] == "WORLDPLAN_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True


def test_a_stopping_replica_finishes_what_it_has_in_flight(objects, monkeypatch):
    main = container(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    sleep, seconds = main["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and float(seconds) > 0
    settings = settings_of(main, monkeypatch)
    needed = float(seconds) + settings.drain_s + settings.default_deadline_ms / 1000
    assert pod["terminationGracePeriodSeconds"] > needed


def test_redis_keeps_the_sessions_on_a_persistent_volume(objects):
    redis = one(objects, "StatefulSet", "redis")
    service = one(objects, "Service", redis["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # the StatefulSet's headless Service
    (main,) = redis["spec"]["template"]["spec"]["containers"]
    # the options tests/test_deploy.py crashes a real redis-server with
    assert main["command"] == load_yaml("compose.yaml")["services"]["redis"]["command"]
    assert main["command"][main["command"].index("--appendonly") + 1] == "yes"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (mount,) = main["volumeMounts"]
    assert mount == {"name": claim["metadata"]["name"], "mountPath": "/data"}
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert {p["containerPort"] for p in main["ports"]} == {
        p["port"] for p in service["spec"]["ports"]
    }


def test_the_autoscaler_scales_the_deployment_on_cpu(objects):
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    deployment = one(objects, "Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert container(objects)["resources"]["requests"]["cpu"]  # what utilisation is of
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_ingress_hashes_each_session_on_the_clients_header(objects):
    annotations = one(objects, "Ingress")["metadata"]["annotations"]
    header = "$http_" + SESSION_HEADER.lower().replace("-", "_")
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == header
    assert header == "$http_x_session_id"
    limit = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert limit.endswith("m") and int(limit[:-1]) << 20 > Settings().max_body_bytes


def test_the_gpu_variant_asks_for_a_gpu_with_the_cuda_image(monkeypatch):
    cpu, gpu = assemble(K8S), assemble(K8S / "gpu")
    main, compose = container(gpu), load_yaml("compose.gpu.yaml")["services"]["worldplan"]
    assert main["resources"]["limits"][GPU] >= 1 and GPU not in container(cpu)["resources"]
    assert main["image"] == compose["image"]
    for name, value in compose["environment"].items():
        assert {"name": name, "value": value} in main["env"]
    settings = settings_of(main, monkeypatch)
    assert settings.max_batch > Settings.model_fields["max_batch"].default
    # only the Deployment differs
    rest = [o for o in gpu if o["kind"] != "Deployment"]
    assert rest == [o for o in cpu if o["kind"] != "Deployment"]


def test_the_compilation_cache_is_on_a_volume_that_outlives_the_container(objects):
    main = container(objects)
    pod = one(objects, "Deployment", "worldplan")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (env,) = [line for line in instruction("ENV") if "WORLDPLAN_COMPILATION_CACHE" in line]
    cache = Path(env.split("=", 1)[1])  # the image's
    (mount,) = [m for m in main["volumeMounts"] if cache.is_relative_to(m["mountPath"])]
    assert {"emptyDir", "persistentVolumeClaim"} & set(volumes[mount["name"]])
