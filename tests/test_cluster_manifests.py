"""The manifests in cluster/: every file parses, carries the fields Ray and KubeRay require, runs the pinned
Ray, and names jobs, configs and config keys that exist. No cluster is started; this runs in seconds.

Each checker returns a list of problems, so the `test_checker_catches_*` tests can feed it a broken copy
of a real manifest and see it fail.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
PYPROJECT = (ROOT / "pyproject.toml").read_text()
RAY_PIN = re.search(r'"ray(?:\[[^\]]*\])?==([^"]+)"', PYPROJECT).group(1)
TORCH_PIN = re.search(r'"torch==([^"]+)"', PYPROJECT).group(1)

YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
SHELL_FILES = sorted(CLUSTER.rglob("*.sh"))
ALL_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def is_ray_up(doc) -> bool:
    return isinstance(doc, dict) and "provider" in doc and "cluster_name" in doc


def is_kuberay(doc) -> bool:
    return isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/")


def docs_where(pred) -> list[tuple[str, dict]]:
    return [(f"{rel(p)}#{i}", d) for p in YAML_FILES for i, d in enumerate(load_docs(p)) if pred(d)]


RAY_UP = docs_where(is_ray_up)
KUBERAY = docs_where(is_kuberay)
K8S_OTHER = docs_where(lambda d: isinstance(d, dict) and "apiVersion" in d and not is_kuberay(d))


def ids(items):
    return [name for name, _ in items]


# ---------------------------------------------------------------- shared helpers


def image_problems(image: str, where: str) -> list[str]:
    """An image must run the pinned Ray: its tag names that version (e.g. rayproject/ray:2.60.0-py311-cpu)."""
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    if not re.search(rf"(^|[^\d.]){re.escape(RAY_PIN)}($|[^\d.])", tag):
        return [f"{where}: image {image!r} does not name the pinned Ray {RAY_PIN} in its tag"]
    return []


def pin_problems(text: str, where: str) -> list[str]:
    """`torch==X` / `ray==X` written anywhere must match pyproject.toml's pins."""
    out = []
    for name, pin in (("torch", TORCH_PIN), ("ray", RAY_PIN)):
        for found in re.findall(rf"\b{name}(?:\[[^\]]*\])?==([\w.+-]+)", text):
            if found.split("+")[0] != pin:
                out.append(f"{where}: {name}=={found} but pyproject.toml pins {name}=={pin}")
    return out


def job_reference_problems(text: str, where: str) -> list[str]:
    """Commands `python .../jobs/X.py .../configs/Y.yaml` must name a job and config of this repository."""
    out = []
    for script in re.findall(r"python3?\s+(\S*jobs/[\w.-]+\.py)", text):
        if not (ROOT / script[script.index("jobs/"):]).is_file():
            out.append(f"{where}: runs {script}, but there is no {script[script.index('jobs/'):]}")
    for cfg in re.findall(r"jobs/[\w.-]+\.py\s+(\S*configs/[\w.-]+\.ya?ml)", text):
        if not (ROOT / cfg[cfg.index("configs/"):]).is_file():
            out.append(f"{where}: runs config {cfg}, but there is no {cfg[cfg.index('configs/'):]}")
    return out


# ---------------------------------------------------------------- every file


def test_pins_are_what_is_installed():
    assert ray.__version__ == RAY_PIN, f"installed Ray {ray.__version__}, pyproject.toml pins {RAY_PIN}"


def test_cluster_has_the_promised_manifests():
    kinds = {d["kind"] for _, d in KUBERAY}
    assert {"RayCluster", "RayJob", "RayService"} <= kinds, kinds
    providers = {d["provider"]["type"] for _, d in RAY_UP}
    assert "local" in providers and providers - {"local"}, providers  # on-prem and a cloud provider
    assert (CLUSTER / "start-local.sh").is_file() and (CLUSTER / "README.md").is_file()


def gpu_image(image: str) -> bool:
    return image.rsplit(":", 1)[-1].endswith("-gpu")


def test_gpu_workers_exist_with_gpu_images():
    """The long-lived KubeRay cluster and the cloud `ray up` cluster have GPU workers on CUDA images, and a
    RayJob runs the GPU config on them; CPU groups stay on CPU images (a CUDA image there wastes gigabytes)."""
    clusters = [(n, d["spec"]) for n, d in KUBERAY if d["kind"] == "RayCluster"]
    for name, spec in clusters:
        groups = {w["groupName"]: w for w in spec["workerGroupSpecs"]}
        for group, w in groups.items():
            gpus = [worker_gpus(c) for c in w["template"]["spec"]["containers"]]
            images = [c["image"] for c in w["template"]["spec"]["containers"]]
            assert all(gpu_image(i) == (g > 0) for i, g in zip(images, gpus)), (name, group, images, gpus)
        assert any(worker_gpus(w["template"]["spec"]["containers"][0]) for w in groups.values()), name
    jobs = [d for _, d in KUBERAY if d["kind"] == "RayJob"]
    assert any("glue_mini_gpu.yaml" in d["spec"]["entrypoint"] for d in jobs)
    clouds = [d for _, d in RAY_UP if d["provider"]["type"] != "local"]
    for cfg in clouds:
        gpu_types = [t for t in cfg["available_node_types"].values()
                     if gpu_image((t.get("docker") or {}).get("worker_image", ""))]
        assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types), "GPU workers scale from zero"
        assert all("--index-url" not in " ".join(t["worker_setup_commands"]) for t in gpu_types), \
            "GPU nodes install torch's CUDA wheel (the default index), not the CPU one"


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_every_yaml_parses_and_is_a_known_kind(path):
    docs = load_docs(path)
    assert docs, f"{rel(path)} is empty"
    for doc in docs:
        assert is_ray_up(doc) or (isinstance(doc, dict) and {"apiVersion", "kind"} <= set(doc)), (
            f"{rel(path)}: neither a `ray up` config (cluster_name, provider) nor a Kubernetes object")


@pytest.mark.parametrize("path", ALL_FILES, ids=rel)
def test_files_name_existing_jobs_configs_and_pinned_versions(path):
    text = path.read_text()
    problems = job_reference_problems(text, rel(path)) + pin_problems(text, rel(path))
    problems += [p for img in re.findall(r"\brayproject/ray:\S+", text) for p in image_problems(img, rel(path))]
    assert not problems, "\n".join(problems)


def test_dockerfile_builds_on_the_pinned_ray_image():
    text = (CLUSTER / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert bases and all(b.startswith("rayproject/ray:") for b in bases), bases
    assert not [p for b in bases for p in image_problems(b, "cluster/Dockerfile")]
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", text, flags=re.M):
        for item in src.split():
            assert (ROOT / item).exists(), f"cluster/Dockerfile copies {item}, which is not in the repository"


@pytest.mark.parametrize("path", SHELL_FILES, ids=rel)
def test_shell_scripts_parse_and_are_executable(path):
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.access(path, os.X_OK), f"{rel(path)} is not executable"


def test_start_local_help_and_stop_without_a_cluster(tmp_path):
    """The script's argument handling, without starting Ray: --help, a bad command, stop with nothing recorded."""
    script = str(CLUSTER / "start-local.sh")
    env = {**os.environ, "KDLIB_LOCAL_STATE_DIR": str(tmp_path)}
    done = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0 and "ray job submit" in done.stdout, done.stdout + done.stderr
    assert subprocess.run([script, "bogus"], capture_output=True, env=env, timeout=30).returncode == 2
    done = subprocess.run([str(CLUSTER / "stop-local.sh")], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0 and "no local cluster" in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------- `ray up` configs


def ray_up_problems(cfg: dict, where: str) -> list[str]:
    out = []
    provider = cfg.get("provider") or {}
    if not cfg.get("cluster_name"):
        out.append(f"{where}: cluster_name is missing")
    if not provider.get("type"):
        out.append(f"{where}: provider.type is missing")
    if provider.get("type") == "local":
        if not provider.get("head_ip") or not provider.get("worker_ips"):
            out.append(f"{where}: the local provider needs provider.head_ip and provider.worker_ips")
        if "available_node_types" in cfg:
            out.append(f"{where}: the local provider takes no available_node_types (Ray makes its own)")
    else:
        types = cfg.get("available_node_types") or {}
        if cfg.get("head_node_type") not in types:
            out.append(f"{where}: head_node_type {cfg.get('head_node_type')!r} is not in available_node_types")
        if not any(name != cfg.get("head_node_type") for name in types):
            out.append(f"{where}: no worker node type")
        if sum(t.get("min_workers", 0) for t in types.values()) > cfg.get("max_workers", 0):
            out.append(f"{where}: max_workers is below the sum of the node types' min_workers")
    head = " ".join(cfg.get("head_start_ray_commands") or [])
    worker = " ".join(cfg.get("worker_start_ray_commands") or [])
    if "ray start --head" not in head:
        out.append(f"{where}: head_start_ray_commands do not run `ray start --head`")
    if "ray start --address" not in worker:
        out.append(f"{where}: worker_start_ray_commands do not run `ray start --address`")
    if any("auth_token" in remote for remote in cfg.get("file_mounts") or {}):
        if "RAY_AUTH_MODE=token" not in head or "RAY_AUTH_MODE=token" not in worker:
            out.append(f"{where}: the auth token is copied to the nodes but RAY_AUTH_MODE=token is not set "
                       "in both start commands")
    docker = cfg.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if docker.get(key):
            out += image_problems(docker[key], f"{where}: docker.{key}")
    return out


def ray_validation_problems(cfg: dict, where: str) -> list[str]:
    """What `ray up` itself applies: its defaults, then ray/autoscaler/ray-schema.json and its own checks."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        if "available_node_types" in cfg:  # the raw file, before defaults hide a typo'd key
            validate_config(copy.deepcopy(cfg))
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except Exception as e:  # jsonschema.ValidationError, ValueError, ...
        return [f"{where}: Ray rejects it: {type(e).__name__}: {str(e).splitlines()[0]}"]
    return []


@pytest.mark.parametrize("name,cfg", RAY_UP, ids=ids(RAY_UP))
def test_ray_up_config(name, cfg):
    problems = ray_up_problems(cfg, name) + ray_validation_problems(cfg, name)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- KubeRay objects

# Fields of the ray.io/v1 CRDs (KubeRay's API reference), to catch misspelt keys Kubernetes would drop.
CLUSTER_SPEC_KEYS = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
                     "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
                     "workerGroupSpecs", "authOptions", "upgradeStrategy"}
HEAD_KEYS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_KEYS = {"groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
               "template", "scaleStrategy", "numOfHosts", "suspend"}
RAYJOB_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
RAYSERVICE_KEYS = {"serveService", "upgradeStrategy", "serveConfigV2", "rayClusterConfig",
                   "excludeHeadPodFromServeSvc"}
SPEC_KEYS = {"RayCluster": CLUSTER_SPEC_KEYS, "RayJob": RAYJOB_KEYS, "RayService": RAYSERVICE_KEYS}
CLUSTER_SPEC_FIELD = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}


def quantity(value) -> float:
    """A Kubernetes quantity ("500m", "4", "16Gi") as a number (CPUs, bytes)."""
    s = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", s)
    if not m or m.group(2) not in ("", *units):
        raise ValueError(f"not a quantity: {value!r}")
    return float(m.group(1)) * units.get(m.group(2), 1)


def pvc_claims() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in K8S_OTHER if d.get("kind") == "PersistentVolumeClaim"}


def pod_problems(group: dict, where: str) -> list[str]:
    out = []
    pod = (group.get("template") or {}).get("spec") or {}
    containers = pod.get("containers") or []
    if not containers:
        return [f"{where}: template.spec.containers is empty"]
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    for c in containers:
        cw = f"{where} container {c.get('name')!r}"
        if not c.get("name") or not c.get("image"):
            out.append(f"{cw}: name and image are required")
            continue
        out += image_problems(c["image"], cw)
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(kind) or {}):
                    out.append(f"{cw}: resources.{kind}.{r} is missing")
        for r in ("cpu", "memory"):
            try:
                if quantity(res["requests"][r]) > quantity(res["limits"][r]):
                    out.append(f"{cw}: requests.{r} exceeds limits.{r}")
            except (KeyError, TypeError):
                pass
            except ValueError as e:
                out.append(f"{cw}: {e}")
        for m in c.get("volumeMounts") or []:
            v = volumes.get(m.get("name"))
            if v is None:
                out.append(f"{cw}: volumeMount {m.get('name')!r} has no volume")
            elif "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"].get("claimName")
                pvc = pvc_claims().get(claim)
                if pvc is None:
                    out.append(f"{cw}: claim {claim!r} is not defined in cluster/")
                elif "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
                    out.append(f"{cw}: claim {claim!r} is not ReadWriteMany, so nodes cannot share it")
    return out


def cluster_spec_problems(spec: dict, where: str) -> list[str]:
    out = [f"{where}: unknown field {k!r}" for k in sorted(set(spec) - CLUSTER_SPEC_KEYS)]
    if str(spec.get("rayVersion")) != RAY_PIN:
        out.append(f"{where}: rayVersion {spec.get('rayVersion')!r} is not the pinned Ray {RAY_PIN}")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        out.append(f"{where}: authOptions.mode is not token (local and ray up clusters run with token auth)")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return out + [f"{where}: headGroupSpec is missing"]
    out += [f"{where}.headGroupSpec: unknown field {k!r}" for k in sorted(set(head) - HEAD_KEYS)]
    groups = [("headGroupSpec", head)]
    workers = spec.get("workerGroupSpecs") or []
    if not workers:
        out.append(f"{where}: workerGroupSpecs is empty (the head runs no tasks: num-cpus 0)")
    names = [w.get("groupName") for w in workers]
    if len(set(names)) != len(names) or not all(names):
        out.append(f"{where}: every worker group needs a distinct groupName: {names}")
    for w in workers:
        ww = f"{where}.workerGroupSpecs[{w.get('groupName')}]"
        out += [f"{ww}: unknown field {k!r}" for k in sorted(set(w) - WORKER_KEYS)]
        counts = [w.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(n, int) for n in counts) or not 0 <= counts[0] <= counts[1] <= counts[2]:
            out.append(f"{ww}: needs integers 0 <= minReplicas <= replicas <= maxReplicas, got {counts}")
        groups.append((ww, w))
    for gw, g in groups:
        params = g.get("rayStartParams") or {}
        bad = {k: v for k, v in params.items() if not isinstance(v, str)}
        if bad:  # the CRD types them map[string]string: `num-cpus: 0` is rejected, `num-cpus: "0"` is not
            out.append(f"{gw}: rayStartParams values must be strings: {bad}")
        out += pod_problems(g, gw)
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        out.append(f"{where}: the head should run no tasks or actors (rayStartParams num-cpus: \"0\")")
    return out


def shared_mounts(spec: dict) -> list[str]:
    """Mount paths of persistent volumes that the head and every worker group mount alike."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    per_group = []
    for g in groups:
        pod = g["template"]["spec"]
        pvcs = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        per_group.append({m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])
                          if m["name"] in pvcs})
    return sorted(set.intersection(*per_group)) if per_group else []


def on_shared_storage(value: str, spec: dict) -> bool:
    if "://" in value:  # a pyarrow.fs URI (s3://, gs://) every node reaches by itself
        return True
    p = PurePosixPath(value)
    return p.is_absolute() and any(p == PurePosixPath(m) or PurePosixPath(m) in p.parents
                                   for m in shared_mounts(spec))


def worker_cpus(spec: dict) -> list[tuple[float, int]]:
    """(CPUs per pod, max pods) per worker group, from the containers' CPU limits."""
    out = []
    for w in spec.get("workerGroupSpecs", []):
        params = w.get("rayStartParams") or {}
        cpu = params.get("num-cpus") or w["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
        out.append((quantity(cpu), int(w["maxReplicas"])))
    return out


def worker_gpus(container: dict) -> float:
    limits = (container.get("resources") or {}).get("limits") or {}
    return float(limits.get("nvidia.com/gpu", 0))


def gpu_pods(spec: dict) -> list[tuple[float, int]]:
    """(GPUs per pod, max pods) per worker group with GPUs, from the containers' nvidia.com/gpu limits."""
    out = []
    for w in spec.get("workerGroupSpecs", []):
        gpus = sum(worker_gpus(c) for c in w["template"]["spec"]["containers"])
        if gpus:
            out.append((gpus, int(w["maxReplicas"])))
    return out


def rayjob_problems(job: dict, where: str) -> list[str]:
    from kdlib.config import load_run_config

    spec, out = job["spec"], []
    cluster = spec.get("rayClusterSpec")
    if not isinstance(cluster, dict):
        return [f"{where}: spec.rayClusterSpec is missing (or use clusterSelector)"]
    if spec.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode", "InteractiveMode",
                                                        "SidecarMode"):
        out.append(f"{where}: unknown submissionMode {spec.get('submissionMode')!r}")
    if "ttlSecondsAfterFinished" in spec and spec.get("shutdownAfterJobFinishes") is not True:
        out.append(f"{where}: ttlSecondsAfterFinished only acts with shutdownAfterJobFinishes: true")
    if "runtimeEnvYAML" in spec and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
        out.append(f"{where}: runtimeEnvYAML is not a YAML mapping")
    entry = spec.get("entrypoint")
    if not isinstance(entry, str) or not entry.strip():
        return out + [f"{where}: spec.entrypoint is missing"]
    argv = shlex.split(entry)
    if Path(argv[0]).name not in ("python", "python3") or len(argv) < 2 or "jobs/" not in argv[1]:
        return out + [f"{where}: entrypoint should be `python .../jobs/<job>.py ...`, got {entry!r}"]
    script = ROOT / argv[1][argv[1].index("jobs/"):]
    if not script.is_file():
        return out + [f"{where}: entrypoint runs {argv[1]}, but {rel(script)} does not exist"]
    if script.name != "distill.py":
        return out
    args = argv[2:]
    config = ROOT / "configs" / "demo.yaml"
    if args and "=" not in args[0]:
        if "configs/" not in args[0] or not (ROOT / args[0][args[0].index("configs/"):]).is_file():
            return out + [f"{where}: entrypoint config {args[0]} is not a file in configs/"]
        config, args = ROOT / args[0][args[0].index("configs/"):], args[1:]
    try:
        cfg = load_run_config(config, args)  # every override names a real key with a valid value
    except Exception as e:
        return out + [f"{where}: entrypoint overrides do not validate against {rel(config)}: {e}"]
    for key in ("storage_root", "data_dir"):
        value = getattr(cfg, key)
        if value is not None and not on_shared_storage(value, cluster):
            out.append(f"{where}: {key}={value} is not on storage all nodes share "
                       f"(a URI, or under one of {shared_mounts(cluster)})")
    # Every Ray request fits a worker pod, and each gang fits the worker groups at full size.
    pods = worker_cpus(cluster)
    biggest, total = max((c for c, _ in pods), default=0), sum(c * n for c, n in pods)
    asks = {"teachers.cpus_per_task": (cfg.teachers.cpus_per_task, len(cfg.tasks)),
            "labeling.cpus_per_actor": (cfg.labeling.cpus_per_actor, cfg.labeling.num_actors),
            "distill.cpus_per_worker": (cfg.distill.cpus_per_worker, cfg.distill.num_workers)}
    for key, (each, count) in asks.items():
        if each > biggest:
            out.append(f"{where}: {key}={each} exceeds the largest worker pod ({biggest} CPUs)")
        if key != "teachers.cpus_per_task" and each * count > total:
            out.append(f"{where}: {count} x {key}={each} exceed the workers' {total} CPUs")
    gpus = gpu_pods(cluster)
    most, all_gpus = max((g for g, _ in gpus), default=0), sum(g * n for g, n in gpus)
    gpu_asks = {"teachers.gpus_per_task": (cfg.teachers.gpus_per_task, 1),
                "labeling.gpus_per_actor": (cfg.labeling.gpus_per_actor, cfg.labeling.num_actors),
                "distill.gpus_per_worker": (cfg.distill.gpus_per_worker, cfg.distill.num_workers)}
    for key, (each, count) in gpu_asks.items():
        if each and each > most:
            out.append(f"{where}: {key}={each} exceeds the largest GPU worker pod ({most} GPUs)")
        elif each * count > all_gpus:
            out.append(f"{where}: {count} x {key}={each} exceed the workers' {all_gpus} GPUs")
    return out


def app_module_exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def rayservice_problems(svc: dict, where: str) -> list[str]:
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    spec, out = svc["spec"], []
    cluster = spec.get("rayClusterConfig")
    if not isinstance(cluster, dict):
        return [f"{where}: spec.rayClusterConfig is missing"]
    raw = spec.get("serveConfigV2")
    if not isinstance(raw, str):
        return [f"{where}: spec.serveConfigV2 must be a YAML string"]
    try:
        serve_cfg = yaml.safe_load(raw)
        ServeDeploySchema.model_validate(serve_cfg)  # Ray Serve's own config schema
    except Exception as e:
        return [f"{where}: serveConfigV2 is not a valid Serve config: {e}"]
    # Serve's schema ignores unknown keys; a misspelt one would silently not apply.
    out += [f"{where}: serveConfigV2: unknown field {k!r}"
            for k in sorted(set(serve_cfg) - set(ServeDeploySchema.model_fields))]
    apps = serve_cfg.get("applications") or []
    if not apps:
        out.append(f"{where}: serveConfigV2 has no applications")
    for app in apps:
        aw = f"{where} app {app.get('name')!r}"
        out += [f"{aw}: unknown field {k!r}" for k in sorted(set(app) - set(ServeApplicationSchema.model_fields))]
        module, _, attr = app.get("import_path", "").partition(":")
        if not attr:
            out.append(f"{aw}: import_path {app.get('import_path')!r} is not module:attribute")
        # kdlib.serve.app (built by jobs/serve.py) may be landing separately; anything else must exist here.
        elif not app_module_exists(module) and module != "kdlib.serve.app":
            out.append(f"{aw}: import_path module {module} is not in the repository")
        if not str(app.get("route_prefix", "/")).startswith("/"):
            out.append(f"{aw}: route_prefix must start with /")
        module_file = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        deployments = app.get("deployments") or []
        for d in deployments:  # overrides for a deployment the app does not define fail `serve deploy`
            if module_file.is_file() and f'"{d.get("name")}"' not in module_file.read_text():
                out.append(f"{aw}: deployment {d.get('name')!r} is not defined in {rel(module_file)}")
        if module == "kdlib.serve.app" and app_module_exists("kdlib.serve.api"):
            from kdlib.serve.api import ServeArgs, UserConfig

            for what, model, value in [("args", ServeArgs, app.get("args") or {}),
                                       *[(f"deployment {d.get('name')!r} user_config", UserConfig, d["user_config"])
                                         for d in deployments if "user_config" in d]]:
                try:
                    model.model_validate(value)
                except Exception as e:
                    out.append(f"{aw}: {what} do not validate against kdlib.serve.api.{model.__name__}: {e}")
        # The model to serve: args.model_dir, or a deployment's user_config.model_dir (live-updatable).
        model_dirs = [(app.get("args") or {}).get("model_dir"),
                      *[(d.get("user_config") or {}).get("model_dir") for d in deployments]]
        model_dirs = [m for m in model_dirs if m]
        if module.startswith("kdlib.") and not model_dirs:
            out.append(f"{aw}: no model_dir (args or a deployment's user_config): nothing to serve")
        for model_dir in model_dirs:
            if not on_shared_storage(str(model_dir), cluster):
                out.append(f"{aw}: model_dir {model_dir} is not on storage the head and workers mount")
    return out


def kuberay_problems(doc: dict, where: str) -> list[str]:
    out = []
    if doc.get("apiVersion") != "ray.io/v1":
        out.append(f"{where}: apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    kind = doc.get("kind")
    if kind not in SPEC_KEYS:
        return out + [f"{where}: kind {kind!r} is not RayCluster, RayJob or RayService"]
    name = (doc.get("metadata") or {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,46}[a-z0-9])?", name):
        out.append(f"{where}: metadata.name {name!r} is not a short DNS label (Kubernetes names services after it)")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return out + [f"{where}: spec is missing"]
    out += [f"{where}: unknown spec field {k!r}" for k in sorted(set(spec) - SPEC_KEYS[kind])]
    field = CLUSTER_SPEC_FIELD[kind]
    cluster = spec if field is None else spec.get(field)
    if not isinstance(cluster, dict):
        return out + [f"{where}: spec.{field} is missing"]
    out += cluster_spec_problems(cluster, f"{where} ({kind})")
    if out:
        return out
    if kind == "RayJob":
        out += rayjob_problems(doc, where)
    if kind == "RayService":
        out += rayservice_problems(doc, where)
    return out


@pytest.mark.parametrize("name,doc", KUBERAY, ids=ids(KUBERAY))
def test_kuberay_object(name, doc):
    problems = kuberay_problems(doc, name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name,doc", K8S_OTHER, ids=ids(K8S_OTHER))
def test_other_kubernetes_objects(name, doc):
    assert doc.get("apiVersion") and doc.get("kind") and (doc.get("metadata") or {}).get("name"), name
    if doc["kind"] == "PersistentVolumeClaim":
        spec = doc["spec"]
        assert "ReadWriteMany" in spec["accessModes"], f"{name}: Ray pods on many nodes share this volume"
        assert quantity(spec["resources"]["requests"]["storage"]) > 0


# ---------------------------------------------------------------- the checkers can fail


def first(kind: str) -> dict:
    return copy.deepcopy(next(d for _, d in KUBERAY if d["kind"] == kind))


def first_ray_up(provider: str) -> dict:
    return copy.deepcopy(next(d for _, d in RAY_UP if (d["provider"]["type"] == "local") == (provider == "local")))


def cluster_of(doc: dict) -> dict:
    field = CLUSTER_SPEC_FIELD[doc["kind"]]
    return doc["spec"] if field is None else doc["spec"][field]


def test_checker_catches_a_wrong_image_tag_and_ray_version():
    doc = first("RayCluster")
    cluster_of(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.9.0-py311"
    cluster_of(doc)["rayVersion"] = "2.9.0"
    problems = "\n".join(kuberay_problems(doc, "x"))
    assert "does not name the pinned Ray" in problems and "rayVersion '2.9.0'" in problems
    assert image_problems(f"rayproject/ray:{RAY_PIN}1-py311-cpu", "x")  # 2.60.01 is not 2.60.0
    assert not image_problems(f"rayproject/ray:{RAY_PIN}-py311-cpu", "x")


def test_checker_catches_missing_resources_and_bad_replicas_and_typos():
    doc = first("RayJob")
    cluster = cluster_of(doc)
    del cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    cluster["workerGroupSpecs"][0]["minReplicas"] = 5
    cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    doc["spec"]["shutdownAfterJobFinish"] = True
    problems = "\n".join(kuberay_problems(doc, "x"))
    for expected in ("resources.limits.memory is missing", "minReplicas <= replicas", "must be strings",
                     "unknown spec field 'shutdownAfterJobFinish'"):
        assert expected in problems, problems


def test_checker_catches_bad_entrypoints():
    for entry, expected in [("python /home/ray/kdlib/jobs/nope.py", "does not exist"),
                            ("python jobs/distill.py configs/missing.yaml", "not a file in configs/"),
                            ("python jobs/distill.py distill.no_such_key=1", "do not validate"),
                            ("python jobs/distill.py storage_root=/tmp/runs", "not on storage all nodes share"),
                            ("python jobs/distill.py distill.cpus_per_worker=64", "exceeds the largest worker"),
                            ("python jobs/distill.py distill.gpus_per_worker=2", "largest GPU worker pod"),
                            ("python jobs/distill.py labeling.gpus_per_actor=0.5 labeling.num_actors=9",
                             "GPU")]:
        doc = first("RayJob")
        doc["spec"]["entrypoint"] = entry
        problems = "\n".join(kuberay_problems(doc, "x"))
        assert expected in problems, (entry, problems)


def test_checker_catches_a_bad_serve_config():
    doc = first("RayService")
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("kdlib.serve.app:build_app",
                                                                        "kdlib.no_such_module:app")
    assert "not in the repository" in "\n".join(kuberay_problems(doc, "x"))
    doc = first("RayService")
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("route_prefix:", "route_prefx:")
    assert "unknown field 'route_prefx'" in "\n".join(kuberay_problems(doc, "x"))
    doc = first("RayService")
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("kdlib.serve.app:build_app", "build_app")
    assert "not a valid Serve config" in "\n".join(kuberay_problems(doc, "x"))
    doc = first("RayService")
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("/mnt/kdlib/runs", "/tmp/runs")
    assert "not on storage the head and workers mount" in "\n".join(kuberay_problems(doc, "x"))
    doc = first("RayService")
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("model_dir:", "model_dirr:")
    assert "nothing to serve" in "\n".join(kuberay_problems(doc, "x"))
    if (ROOT / "kdlib" / "serve" / "app.py").is_file():
        doc = first("RayService")
        doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("name: KdlibServer", "name: Nope")
        assert "deployment 'Nope' is not defined" in "\n".join(kuberay_problems(doc, "x"))


def test_checker_catches_bad_ray_up_configs():
    cfg = first_ray_up("cloud")
    cfg["head_node_type"] = "nope"
    assert "head_node_type 'nope'" in "\n".join(ray_up_problems(cfg, "x"))
    assert ray_validation_problems(cfg, "x")
    cfg = first_ray_up("cloud")
    cfg["docker"]["image"] = "rayproject/ray:latest"
    cfg["setup_commandz"] = []
    assert image_problems(cfg["docker"]["image"], "x") and ray_validation_problems(cfg, "x")
    cfg = first_ray_up("local")
    cfg["available_node_types"] = {"a": {"resources": {}, "node_config": {}}}
    assert "takes no available_node_types" in "\n".join(ray_up_problems(cfg, "x"))


def test_checker_catches_missing_jobs_and_wrong_pins():
    assert job_reference_problems("python jobs/nope.py", "x")
    assert job_reference_problems("python jobs/distill.py configs/nope.yaml", "x")
    assert not job_reference_problems("python jobs/distill.py configs/glue_mini.yaml", "x")
    assert pin_problems("pip install torch==1.0.0", "x") and not pin_problems(f"torch=={TORCH_PIN}", "x")
