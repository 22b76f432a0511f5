"""docker/ checked statically (no Docker engine or Kubernetes here): the Dockerfile, compose.yaml and the KubeRay
RayJob / RayService manifests parse; every file, command, flag and config they reference exists (configs load
with their overrides); images are pinned; nothing binds a public interface by accident; the Ray token is wired
on every node; compose deploys Serve on its published port, with the Serve token on every node."""
from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT

DOCKER = PROJECT / "docker"
BIN = PROJECT / ".venv" / "bin"
WORKDIR = "/opt/labelshift"  # the image's copy of the repository
ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of docker/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _args() -> dict[str, str]:
    return dict(arg.split("=", 1) for op, arg in _dockerfile() if op == "ARG" and "=" in arg)


def _expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


@functools.cache
def _help(*command: str) -> str:
    return subprocess.run([str(BIN / command[0]), *command[1:], "--help"], capture_output=True, text=True,
                          timeout=120).stdout


def _check_flags(argv: list[str]) -> None:
    """Every ``--flag`` of a ray start / mlflow server command line exists in that command's --help."""
    command = argv[:2]
    assert (BIN / command[0]).is_file(), f"{command[0]} is not installed by the project"
    text = _help(*command)
    for flag in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", text), f"`{' '.join(command)}` has no option {flag}"


def _pinned(image: str) -> bool:
    """A registry image with an explicit version tag (digits), never a floating one."""
    name, _, tag = image.rpartition(":")
    return bool(name and "/" not in tag and re.search(r"\d", tag) and tag not in ("latest", "stable"))


def _repo_path(image_path: str) -> Path:
    assert image_path.startswith(WORKDIR + "/"), f"{image_path} is not in the image's copy of the repository"
    return PROJECT / image_path.removeprefix(WORKDIR + "/")


# ------------------------------------------------------------------------------------------------ Dockerfile
def test_the_dockerfile_is_cpu_by_default_and_cuda_by_argument_with_a_matching_torch():
    instructions = _dockerfile()
    args = _args()
    base = next(arg for op, arg in instructions if op == "FROM")
    assert _expand(base, args) == f"rayproject/ray:{ray.__version__}-py311-cpu"
    assert _expand(base, {**args, "FLAVOUR": "cu128"}) == f"rayproject/ray:{ray.__version__}-py311-cu128"
    torch_install = next(arg for op, arg in instructions if op == "RUN" and "torch==" in arg)
    assert 'download.pytorch.org/whl/${FLAVOUR}"' in torch_install  # the wheel of the base image's CUDA (or CPU)
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    torchvision = pytest.importorskip("torchvision")
    assert args["TORCHVISION_VERSION"] == torchvision.__version__.split("+")[0]


def test_the_image_runs_as_a_non_root_user_that_owns_its_work_dir_and_copies_existing_files():
    instructions = _dockerfile()
    users = [arg for op, arg in instructions if op == "USER"]
    assert users[-1] == "ray"
    workdir = next(arg for op, arg in instructions if op == "WORKDIR")
    assert workdir == WORKDIR
    chown = next(arg for op, arg in instructions if op == "RUN" and "chown" in arg)
    assert f"chown -R ray:users {WORKDIR}" in chown
    assert instructions.index(("USER", "ray")) < instructions.index(("WORKDIR", WORKDIR))
    for op, arg in instructions:
        if op == "COPY":
            parts = arg.split()
            assert parts[0] == "--chown=ray:users", f"COPY {arg}: files must belong to the image's user"
            assert all((PROJECT / source).exists() for source in parts[1:-1]), arg
    copied = {Path(arg.split()[1]).parts[0] for op, arg in instructions if op == "COPY"}
    assert {"labelshift", "ray_jobs", "serve", "configs"} <= copied
    cmd = next(arg for op, arg in instructions if op == "CMD")
    assert '"--dashboard-host", "127.0.0.1"' in cmd


def _same_application_as_serve_config(application: dict) -> str:
    """The bundle path of a Serve application that is serve/config.yaml's (the same import path, settings,
    deployments and ``user_config``) but for its bundle; its settings validate and its import path exists."""
    from labelshift.serving.settings import ServeSettings

    (local,) = _yaml(PROJECT / "serve" / "config.yaml")["applications"]
    args = dict(application["args"])
    bundle = args.pop("bundle")
    assert {**application, "args": args} == {**local, "args": {k: v for k, v in local["args"].items() if k != "bundle"}}
    ServeSettings(bundle=bundle, **args)
    module, _, function = application["import_path"].partition(":")
    source = PROJECT / (module.replace(".", "/") + ".py")
    assert source.is_file() and f"def {function}(" in source.read_text()
    return bundle


# ------------------------------------------------------------------------------------------------ compose
def _compose() -> dict:
    return _yaml(DOCKER / "compose.yaml")


def test_compose_publishes_only_on_loopback_and_pins_its_images():
    compose = _compose()
    services = compose["services"]
    assert {"ray-head", "ray-worker", "mlflow", "mlflow-db"} <= set(services)
    for name, service in services.items():
        assert _pinned(service["image"]), f"{name}: image {service['image']} is not pinned"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        if "build" in service:
            assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == \
                DOCKER / "Dockerfile"
    assert services["ray-head"]["ports"] == ["127.0.0.1:8265:8265", "127.0.0.1:8000:8000"]
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]


SERVE_TOKEN_EXPORT = re.compile(r'LABELSHIFT_SERVE_TOKEN="\$\$\(cat /run/secrets/(\w+)\)" exec (.+)')


def _ray_node(service: dict) -> tuple[list[str], str]:
    """(the ``ray start`` argv, the secret LABELSHIFT_SERVE_TOKEN is read from) of a compose Ray node, whose command
    is ``sh -c 'LABELSHIFT_SERVE_TOKEN="$(cat /run/secrets/S)" exec ray start ...'``."""
    shell, option, script = service["command"]
    match = SERVE_TOKEN_EXPORT.fullmatch(script)
    assert (shell, option) == ("sh", "-c") and match, service["command"]
    return shlex.split(match.group(2)), match.group(1)


def test_compose_turns_ray_token_authentication_on_for_every_ray_node():
    compose = _compose()
    for name in ("ray-head", "ray-worker", "serve-deploy"):  # serve-deploy: `serve deploy` to the dashboard
        service = compose["services"][name]
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        secret = service["environment"]["RAY_AUTH_TOKEN_PATH"].removeprefix("/run/secrets/")
        assert secret in service["secrets"] and secret in compose["secrets"]
    for name in ("ray-head", "ray-worker"):
        argv, _ = _ray_node(compose["services"][name])
        assert argv[:2] == ["ray", "start"]
        _check_flags(argv)
    assert "--dashboard-host=0.0.0.0" in _ray_node(compose["services"]["ray-head"])[0]  # only with the token above
    assert _ray_node(compose["services"]["ray-worker"])[0][2] == "--address=ray-head:6379"
    for secret in compose["secrets"].values():  # secret files live in docker/secrets/, which git ignores
        path = DOCKER / secret["file"]
        assert path.parent == DOCKER / "secrets"
        assert subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=PROJECT).returncode == 0


def test_compose_deploys_serve_on_its_published_port_with_the_serve_token_on_every_node():
    from ray.serve.schema import ServeDeploySchema

    compose = _compose()
    services = compose["services"]
    head, _ = _ray_node(services["ray-head"])
    deploy = services["serve-deploy"]
    argv = deploy["command"]
    assert argv[:2] == ["serve", "deploy"] and deploy["profiles"] == ["serve"]  # on demand, after a job's export
    _check_flags(argv)
    assert argv[argv.index("--address") + 1] == "http://ray-head:8265" and "--dashboard-port=8265" in head
    config_path = PROJECT / argv[-1]  # relative to the image's work dir, a copy of the repository
    copied = {Path(arg.split()[1]).parts[0] for op, arg in _dockerfile() if op == "COPY"}
    assert config_path.is_file() and Path(argv[-1]).parts[0] in copied
    config = _yaml(config_path)
    ServeDeploySchema.model_validate(config)  # what `serve deploy` sends
    # the proxy runs on the head and listens beyond the container's loopback (a published port reaches only the
    # container's interface), on the port the head publishes on the host's 127.0.0.1
    assert (config["proxy_location"], config["http_options"]["host"]) == ("HeadOnly", "0.0.0.0")
    port = config["http_options"]["port"]
    assert f"127.0.0.1:{port}:{port}" in services["ray-head"]["ports"]
    (application,) = config["applications"]
    job_output = re.search(r"output_dir=(\S+)", (DOCKER / "compose.yaml").read_text()).group(1)
    assert _same_application_as_serve_config(application) == f"{job_output}/stages/export/bundles/adapted"
    # beyond loopback, PUT /v1/priors needs LABELSHIFT_SERVE_TOKEN: every Ray node (where replicas and the
    # application build run) reads it from the same compose secret
    secrets = {_ray_node(services[name])[1] for name in ("ray-head", "ray-worker")}
    assert secrets == {"serve_token"} and "serve_token" in compose["secrets"]
    assert all("serve_token" in services[name]["secrets"] for name in ("ray-head", "ray-worker"))


def test_compose_runs_mlflow_on_a_database_with_an_artifact_volume():
    compose = _compose()
    mlflow = compose["services"]["mlflow"]
    script = mlflow["command"][2]
    argv = shlex.split(script.removeprefix("exec ").replace("$$", "$"))
    assert argv[:2] == ["mlflow", "server"]
    _check_flags(argv)
    backend = argv[argv.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql://mlflow:") and backend.endswith("@mlflow-db:5432/mlflow")
    assert compose["services"]["mlflow-db"]["image"].startswith("postgres:")
    destination = argv[argv.index("--artifacts-destination") + 1]
    assert f"mlartifacts:{destination}" in mlflow["volumes"] and "mlartifacts" in compose["volumes"]
    assert compose["services"]["ray-head"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "psycopg2-binary==" in next(a for op, a in _dockerfile() if op == "RUN" and '".[ray]"' in a)


# ------------------------------------------------------------------------------------------------ KubeRay
def _containers(spec: dict) -> list[dict]:
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    found = [c for group in groups for c in group["template"]["spec"]["containers"]]
    if "submitterPodTemplate" in spec:
        found += spec["submitterPodTemplate"]["spec"]["containers"]
    return found


def _check_ray_pods(spec: dict) -> None:
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    for container in _containers(spec):
        assert _pinned(container["image"]) and container["image"].startswith("labelshift:")
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "labelshift-ray-token"
    assert "serviceType" not in cluster["headGroupSpec"]  # ClusterIP: nothing published outside the cluster


def _kuberay_spec(name: str, kind: str) -> dict:
    """The ``spec`` of a KubeRay manifest under docker/kuberay/, after checking its kind and its Ray pods."""
    manifest = _yaml(DOCKER / "kuberay" / name)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind)
    _check_ray_pods(manifest["spec"])
    return manifest["spec"]


def _load_refine():
    spec = importlib.util.spec_from_file_location("refine_entry", PROJECT / "ray_jobs" / "refine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rayjob_runs_refine_py_with_a_config_that_loads_and_paths_on_mounted_volumes():
    from labelshift.config import load_config

    spec = _kuberay_spec("rayjob.yaml", "RayJob")
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and _repo_path(argv[1]) == PROJECT / "ray_jobs" / "refine.py"
    args = _load_refine().parse_args(argv[2:])
    config = _repo_path(args.config)
    cfg = load_config(config, args.overrides)  # unknown or invalid keys would raise
    assert cfg.model.name == "deeplabv2_resnet101" and cfg.ray.use_gpu
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"]: m for m in head["volumeMounts"]}
    assert cfg.output_dir.startswith("/shared/") and cfg.ray.storage_path.startswith("/shared/")
    assert not mounts["/shared"].get("readOnly") and mounts["/data"]["readOnly"]
    for root in (cfg.data.source.root, cfg.data.target.root, cfg.model.checkpoint):
        assert root.startswith("/data/")
    assert cfg.tracking.tracking_uri.startswith("http://")  # an MLflow server, never a store inside the pod
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == cfg.ray.num_workers
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_rayservice_serves_the_application_of_serve_config_yaml():
    spec = _kuberay_spec("rayservice.yaml", "RayService")
    served = yaml.safe_load(spec["serveConfigV2"])
    (application,) = served["applications"]
    bundle = _same_application_as_serve_config(application)
    assert bundle.startswith("/shared/") and bundle.endswith("/stages/export/bundles/adapted")
    # the proxy listens beyond loopback inside the pod only: then PUT /v1/priors must have its token
    assert served["http_options"]["host"] == "0.0.0.0"
    assert _yaml(PROJECT / "serve" / "config.yaml")["http_options"]["host"] == "127.0.0.1"
    for container in _containers(spec):
        env = {e["name"]: e for e in container["env"]}
        assert env["LABELSHIFT_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "labelshift-serve-token"


def test_refine_py_takes_a_sweeps_overrides_file_before_the_command_lines_overrides(tmp_path, capsys):
    from labelshift.config import load_config

    refine = _load_refine()
    best = tmp_path / "best_overrides.yaml"  # as ray_jobs/sweep.py writes it: {config path: value}
    best.write_text("adjust.temperature: 0.75\nprior.method: reference\nadjust.tau_target: 1.5\n")
    args = refine.parse_args(["--config", "configs/demo.yaml", "--overrides-file", str(best), "adjust.tau_target=2"])
    cfg = load_config(PROJECT / "configs" / "demo.yaml", refine.job_overrides(args))
    assert (cfg.adjust.temperature, cfg.prior.method, cfg.adjust.tau_target) == (0.75, "reference", 2.0)
    assert refine.main(["--config", str(PROJECT / "configs" / "demo.yaml"), "--overrides-file",
                        str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
