"""The deployment files, checked as far as possible without a Docker engine.

Docker cannot run where these tests run, so what they check is everything short of building
and starting the containers:

* ``docker-compose.yml`` is valid against the Compose specification's JSON schema (a pinned
  copy in ``tests/fixtures/compose-spec.json``), after Compose-style ``${VAR:-default}``
  interpolation with nothing set, as in a fresh clone;
* every path it names exists (build context, Dockerfile, bind-mounted files), every named
  volume is declared, every dependency exists and is active whenever its dependant is;
* every port it publishes is the port the program in the container listens on: the server's
  settings are parsed from the service's command and environment by the server's own parser;
* every command and entrypoint names a console script of this project, and every flag it passes
  (and every ``CIFAR_SERVE_*`` variable it sets) appears in that script's ``--help``;
* the export service's command really runs outside a container (container paths mapped onto
  the files the Dockerfile copies and onto temporary volumes) and writes ``manifest.json``;
* the Dockerfile: pinned base image, several stages, the artifacts exported at build time from
  the shipped weights, a non-root USER, EXPOSEd ports, the entrypoint, pinned dependencies,
  and a HEALTHCHECK that is the very command compose's healthcheck runs; that command is run
  against a real server (exit 0 while SERVING) and against a closed port (non-zero);
* ``.dockerignore`` lets every COPY source through and keeps .git, .venv and artifacts/ out.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
dockerfile_parser = pytest.importorskip("dockerfile")

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
SCHEMA = REPO / "tests" / "fixtures" / "compose-spec.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
CONSTRAINTS = REPO / "deploy" / "constraints.txt"
SHIPPED_WEIGHTS = "models/resnet18_cifar10.pt"
SHIPPED_SAMPLE = "tests/fixtures/cifar10-test-sample.zip"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
# Each server variant and the one-shot export that must complete before it starts.
STACKS = {"server": "export", "server-cpu": "export-cpu"}
DOCKER_STOP_TIMEOUT_S = 10.0  # `docker stop`'s default before SIGKILL


# ---------------------------------------------------------------------------------------------
# Compose: loading and interpolation
# ---------------------------------------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``$$``...)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("plain")
        op, arg = m.group("op"), m.group("arg") or ""
        val = env.get(name)
        present = val is not None and (val != "" or not (op or "").startswith(":"))
        if op in (":-", "-"):
            return val if present and val is not None else arg
        if op in (":+", "+"):
            return arg if present else ""
        if op in (":?", "?"):
            if not present:
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return str(val)
        if val is None:
            raise AssertionError(f"${name} is unset and has no default: a fresh clone would get ''")
        return val

    return _VAR.sub(sub, value)


@functools.cache
def _raw_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as f:
        doc = yaml.safe_load(f)  # resolves the YAML anchors and << merges, as Compose does
    assert isinstance(doc, dict)
    return doc


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = interpolate(copy.deepcopy(_raw_compose()), env or {})
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def named(self) -> bool:
        return not self.source.startswith((".", "/", "~"))


def _mounts(svc: dict[str, Any]) -> list[Mount]:
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            out.append(Mount(str(v.get("source", "")), v["target"], bool(v.get("read_only"))))
            continue
        parts = v.split(":")
        assert len(parts) in (2, 3), f"volume {v!r}: expected SOURCE:TARGET[:MODE]"
        out.append(Mount(parts[0], parts[1], len(parts) == 3 and "ro" in parts[2].split(",")))
    return out


def _ports(svc: dict[str, Any]) -> list[tuple[int, int]]:
    """(published, container) for every port the service publishes."""
    out = []
    for p in svc.get("ports", []):
        if isinstance(p, dict):
            out.append((int(p["published"]), int(p["target"])))
            continue
        text = str(p).split("/")[0]
        parts = text.rsplit(":", 2)
        assert len(parts) >= 2, f"port {p!r} publishes no fixed host port"
        out.append((int(parts[-2]), int(parts[-1])))
    return out


def _publish_ips(svc: dict[str, Any]) -> set[str]:
    """The host address of every published port ('' = all interfaces, Docker's default)."""
    out = set()
    for p in svc.get("ports", []):
        if isinstance(p, dict):
            out.add(str(p.get("host_ip", "")))
            continue
        parts = str(p).split("/")[0].rsplit(":", 2)
        out.add(parts[0] if len(parts) == 3 else "")
    return out


def _profiles(svc: dict[str, Any]) -> set[str]:
    return set(svc.get("profiles", []))


def _aliases(svc: dict[str, Any]) -> set[str]:
    nets = svc.get("networks") or {}
    if isinstance(nets, list):
        return set()
    return {a for net in nets.values() if net for a in net.get("aliases", [])}


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(number) * units[unit]
    assert re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+", text), f"not a duration: {text!r}"
    return total


# ---------------------------------------------------------------------------------------------
# Dockerfile: parsed by BuildKit's own parser (the ``dockerfile`` package), arranged in stages
# ---------------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    commands: list[Any] = field(default_factory=list)  # dockerfile.Command

    def all(self, keyword: str) -> list[Any]:
        return [c for c in self.commands if c.cmd.upper() == keyword]


@dataclass
class Copy:
    options: dict[str, str]
    sources: list[str]
    dest: str  # absolute, resolved against WORKDIR


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def resolve(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.global_args.get(m.group(1), m.group(0)), text)

    def runs(self, stage: Stage | None = None) -> list[str]:
        """The shell text of every RUN (of one stage, or of all)."""
        return [" ".join(c.value) for s in ([stage] if stage else self.stages) for c in s.all("RUN")]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for c in self.final.all("ENV"):
            out.update(zip(c.value[::2], c.value[1::2], strict=True))
        return out

    def workdir(self, stage: Stage, upto: Any = None) -> str:
        """The WORKDIR in effect in ``stage`` (before command ``upto``; at its end without)."""
        parent = next((s for s in self.stages if s.name and s.name == stage.base), None)
        workdir = self.workdir(parent) if parent is not None and parent is not stage else "/"
        for c in stage.commands:
            if c is upto:
                break
            if c.cmd.upper() == "WORKDIR":
                workdir = posixpath.join(workdir, c.value[0])
        return workdir

    def copies(self, stage: Stage) -> list[Copy]:
        out = []
        for c in stage.all("COPY") + stage.all("ADD"):
            options = dict(f[2:].partition("=")[::2] for f in c.flags)
            *sources, dest = c.value
            out.append(Copy(options, sources, posixpath.join(self.workdir(stage, upto=c), dest)))
        return out

    def exec_form(self, keyword: str) -> list[str]:
        found = self.final.all(keyword)
        assert found, f"the final stage has no {keyword}"
        assert found[-1].json, f"{keyword} should use the exec (JSON) form, not a shell string"
        return list(found[-1].value)

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        found = self.final.all("HEALTHCHECK")
        assert len(found) == 1, "the final stage needs exactly one HEALTHCHECK"
        hc = found[0]
        assert hc.value and hc.value[0] == "CMD", "HEALTHCHECK is not 'HEALTHCHECK [OPTIONS] CMD ...'"
        assert hc.json, "HEALTHCHECK CMD should use the exec (JSON) form"
        options = dict(f[2:].partition("=")[::2] for f in hc.flags)
        return options, list(hc.value[1:])


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for c in dockerfile_parser.parse_file(str(path)):  # raises GoParseError on a syntax error
        keyword = c.cmd.upper()
        if keyword == "FROM":
            value = list(c.value)
            name = value[2] if len(value) == 3 and value[1].upper() == "AS" else None
            assert len(value) in (1, 3), f"cannot read FROM {' '.join(value)}"
            stages.append(Stage(value[0], name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            key, _, default = c.value[0].partition("=")
            global_args[key] = default
        else:
            stages[-1].commands.append(c)
    return Dockerfile(global_args, stages)


@pytest.fixture(scope="module")
def docker() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


def _our_image(svc: dict[str, Any]) -> bool:
    build = svc.get("build")
    if build is None:
        return False
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return (REPO / context / dockerfile).resolve() == DOCKERFILE


def _argv(svc: dict[str, Any], docker: Dockerfile) -> list[str]:
    """What the container runs: compose's entrypoint/command over the image's (Docker's rules)."""

    def split(value: Any) -> list[str]:
        return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]

    if "entrypoint" in svc:  # overriding the entrypoint also drops the image's CMD
        entry = split(svc["entrypoint"])
        cmd = split(svc.get("command", []))
    else:
        entry = docker.exec_form("ENTRYPOINT")
        cmd = split(svc["command"]) if "command" in svc else docker.exec_form("CMD")
    return entry + cmd


def _container_env(svc: dict[str, Any], docker: Dockerfile) -> dict[str, str]:
    return {**docker.env(), **_env_of(svc)}


# ---------------------------------------------------------------------------------------------
# Running container commands outside a container
# ---------------------------------------------------------------------------------------------


def _program(name: str) -> str:
    """The console script ``name`` of the environment running the tests."""
    assert name in SCRIPTS, f"{name!r} is not a console script of this project ({sorted(SCRIPTS)})"
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"console script {name} is not installed (pip install -e .)"
    return found


@functools.cache
def _help(name: str) -> str:
    proc = subprocess.run([_program(name), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{name} --help failed:\n{proc.stderr}"
    return proc.stdout


def _assert_flags_in_help(argv: list[str], env: dict[str, str] | None = None) -> None:
    text = _help(argv[0])
    for token in argv[1:]:
        if token.startswith("-") and len(token) > 1:
            flag = token.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
                f"{argv[0]} has no flag {flag} (from {shlex.join(argv)})"
            )
    for name in env or {}:
        if name.startswith("CIFAR_SERVE_"):
            assert name in text, f"{argv[0]} --help does not mention the variable {name} it is given"


class ContainerFS:
    """Maps container paths onto the project (what the Dockerfile copies) and onto volumes."""

    def __init__(self, docker: Dockerfile, built: dict[str, Path]) -> None:
        self.map: dict[str, Path] = {}
        for c in docker.copies(docker.final):
            frm = c.options.get("from")
            if frm is None:
                for src in c.sources:
                    target = c.dest
                    if target.endswith("/"):
                        target = posixpath.join(target, posixpath.basename(src))
                    self.map[target.rstrip("/")] = REPO / src
            elif frm in built:
                self.map[c.dest.rstrip("/")] = built[frm]

    def mount(self, target: str, host: Path) -> None:
        self.map[target.rstrip("/")] = host

    def host(self, path: str) -> str:
        for prefix in sorted(self.map, key=len, reverse=True):
            if path == prefix or path.startswith(prefix + "/"):
                return str(self.map[prefix]) + path[len(prefix) :]
        return path

    def argv(self, argv: list[str]) -> list[str]:
        prog = sys.executable if argv[0] in ("python", "python3") else _program(argv[0])
        return [prog, *(self.host(a) if a.startswith("/") else a for a in argv[1:])]


def _run(
    argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **{k: v for k, v in env.items() if k != "PATH" and not k.startswith("PYTHON")}}
    return subprocess.run(argv, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# =============================================================================================
# docker-compose.yml
# =============================================================================================


@pytest.fixture(scope="module")
def validator() -> Any:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _schema_errors(validator: Any, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def test_schema_fixture_is_the_recorded_copy() -> None:
    import hashlib

    recorded = re.search(r"sha256: ([0-9a-f]{64})", SCHEMA.with_suffix(".README.md").read_text())
    assert recorded, "tests/fixtures/compose-spec.README.md records no sha256"
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == recorded.group(1)


def test_compose_file_is_valid_against_the_compose_spec(validator: Any) -> None:
    assert _schema_errors(validator, _raw_compose()) == []
    assert _schema_errors(validator, load_compose()) == []
    # Also with the variables the comments document set.
    trained = load_compose({"CHECKPOINT": "/runs/model.pt", "CIFAR10_DATA": "/srv/cifar-10"})
    assert _schema_errors(validator, trained) == []


def test_the_schema_is_strict_enough_to_catch_mistakes(validator: Any) -> None:
    broken = load_compose()
    broken["services"]["server"]["healtcheck"] = broken["services"]["server"].pop("healthcheck")
    assert _schema_errors(validator, broken)
    broken = load_compose()
    broken["services"]["server"]["depends_on"]["export"]["condition"] = "service_finished"
    assert _schema_errors(validator, broken)
    broken = load_compose()
    broken["services"]["server"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    assert _schema_errors(validator, broken)


def test_compose_has_the_services_and_profiles(services: dict[str, dict[str, Any]]) -> None:
    assert {"server", "server-cpu", "export", "export-cpu", "train", "prometheus"} <= set(services)
    assert _profiles(services["server"]) == set()
    assert _profiles(services["export"]) == set()
    assert _profiles(services["server-cpu"]) == {"cpu"}
    assert _profiles(services["export-cpu"]) == {"cpu"}
    assert _profiles(services["train"]) == {"train"}
    assert _profiles(services["prometheus"]) == {"monitoring"}


def test_server_reserves_one_nvidia_gpu_and_the_cpu_variant_none(
    services: dict[str, dict[str, Any]], docker: Dockerfile
) -> None:
    gpu = services["server"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["server-cpu"]
    for name, svc in services.items():
        if not _our_image(svc):
            continue
        reserved = bool(svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices"))
        variant = (svc["build"].get("args") or {}).get("TORCH_VARIANT", "cpu")
        argv = _argv(svc, docker)
        if argv[0] == "cifar-serve":
            from cifar_serve.server.settings import settings_from_args

            device = settings_from_args(argv[1:], _container_env(svc, docker)).device
            assert device.startswith("cuda") == reserved, f"{name}: --device {device} vs GPU reservation"
        # A GPU is only useful to an image whose torch can use it.
        if reserved:
            assert variant != "cpu", f"{name} reserves a GPU but builds the CPU-only torch"


def test_every_path_compose_names_exists(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        build = svc.get("build")
        if build is not None:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            assert context.is_dir(), f"{name}: build context {context} is missing"
            if isinstance(build, dict):
                assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: no Dockerfile"
        for m in _mounts(svc):
            if m.named:
                assert m.source in declared, f"{name}: volume {m.source!r} is not declared at the top level"
            else:
                assert (REPO / m.source).exists(), f"{name}: bind mount source {m.source} is missing"
        for env_file in _list(svc.get("env_file")):
            path = env_file if isinstance(env_file, str) else env_file["path"]
            assert (REPO / path).is_file(), f"{name}: env_file {path} is missing"


def test_images_are_pinned_and_our_images_are_built(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        image = svc.get("image", "")
        if _our_image(svc):
            assert image.startswith("cifar-serve:"), f"{name}: tag our image cifar-serve:<variant>"
            continue
        assert "build" not in svc
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image!r} is not pinned to a version"


def test_dependencies_exist_and_are_active_with_their_dependants(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in services, f"{name} depends on unknown service {dep}"
            needed = _profiles(services[dep])
            assert not needed or needed & _profiles(svc), (
                f"{name} depends on {dep}, which is only in profiles {needed}"
            )
    for name, export in STACKS.items():
        assert services[name]["depends_on"] == {export: {"condition": "service_completed_successfully"}}


def _image_of(svc: dict[str, Any]) -> tuple[str, tuple[tuple[str, str], ...]]:
    args = (svc.get("build") or {}).get("args") or {}
    return svc["image"], tuple(sorted((str(k), str(v)) for k, v in args.items()))


def test_each_stack_exports_with_its_servers_image(services: dict[str, dict[str, Any]]) -> None:
    # A GPU host running `docker compose up` builds one image (PyPI's CUDA torch), never the
    # CPU variant with its extra wheel index; the CPU stack likewise builds only the CPU image.
    for server, export in STACKS.items():
        assert _image_of(services[export]) == _image_of(services[server]), f"{export} vs {server}"
    default = {_image_of(svc) for svc in services.values() if _our_image(svc) and not _profiles(svc)}
    assert default == {_image_of(services["server"])}, "`docker compose up` would build several images"
    cpu_stack = {n for n, svc in services.items() if _our_image(svc) and _profiles(svc) == {"cpu"}}
    assert {_image_of(services[n]) for n in cpu_stack} == {_image_of(services["server-cpu"])}


def test_the_server_reads_the_volume_the_export_writes(
    services: dict[str, dict[str, Any]], docker: Dockerfile
) -> None:
    from cifar_serve.server.settings import settings_from_args

    for name, export_name in STACKS.items():
        export = services[export_name]
        export_argv = _argv(export, docker)
        assert export_argv[0] == "cifar-export"
        out = export_argv[export_argv.index("--out") + 1]
        writes = [
            m for m in _mounts(export) if m.named and (out == m.target or out.startswith(m.target + "/"))
        ]
        assert len(writes) == 1 and not writes[0].read_only, f"export --out {out}: not on a writable volume"
        volume, rel = writes[0].source, posixpath.relpath(out, writes[0].target)
        svc = services[name]
        settings = settings_from_args(_argv(svc, docker)[1:], _container_env(svc, docker))
        reads = [m for m in _mounts(svc) if m.source == volume]
        assert len(reads) == 1, f"{name} does not mount the {volume} volume"
        assert reads[0].read_only, f"{name} should mount {volume} read-only"
        seen_as = posixpath.normpath(posixpath.join(reads[0].target, rel))
        assert seen_as == posixpath.normpath(settings.model_dir), f"{name} serves another folder"


def test_train_ships_its_model_where_export_can_read_it(
    services: dict[str, dict[str, Any]], docker: Dockerfile
) -> None:
    train, export = services["train"], services["export"]
    argv = _argv(train, docker)
    assert argv[0] == "cifar-train"
    env = _container_env(train, docker)
    data = env["CIFAR_SERVE_DATA"]
    assert any(m.target == data for m in _mounts(train)), "CIFAR_SERVE_DATA is not a mounted folder"
    ship = argv[argv.index("--ship") + 1]
    [runs] = [m for m in _mounts(train) if ship.startswith(m.target + "/")]
    assert runs.named and not runs.read_only
    assert any(m.source == runs.source and m.target == runs.target for m in _mounts(export)), (
        "export must mount the training volume at the same path so that CHECKPOINT=<--ship> works"
    )
    trained = load_compose({"CHECKPOINT": ship})["services"]["export"]
    assert _argv(trained, docker)[_argv(trained, docker).index("--checkpoint") + 1] == ship


def test_published_ports_are_the_ports_the_programs_listen_on(
    services: dict[str, dict[str, Any]], docker: Dockerfile
) -> None:
    from cifar_serve.server.settings import Settings, settings_from_args

    for name, svc in services.items():
        ports = _ports(svc)
        if not _our_image(svc):
            continue
        argv = _argv(svc, docker)
        if argv[0] != "cifar-serve":
            assert not ports, f"{name} ({argv[0]}) publishes ports but serves nothing"
            continue
        settings = settings_from_args(argv[1:], _container_env(svc, docker))
        assert settings.host == "0.0.0.0", f"{name}: a container must listen on all interfaces"
        served = (settings.port, settings.http_port, settings.metrics_port)
        assert {c for _, c in ports} == set(served), name  # gRPC, the v2 REST API, metrics
        assert served == (Settings.port, Settings.http_port, Settings.metrics_port)
        assert {h for h, _ in ports} == {c for _, c in ports}, f"{name}: publish on the documented ports"
        # Compose's stop timeout must outlast the server's own drain.
        assert _duration_s(svc["stop_grace_period"]) > settings.grace_period_s

    for name, svc in services.items():
        # The server has no TLS and no token unless asked: publish on loopback unless told otherwise.
        assert _publish_ips(svc) <= {"127.0.0.1"}, f"{name} publishes on {_publish_ips(svc)}"

    prom = services["prometheus"]
    flags = dict(a.split("=", 1) for a in prom["command"] if "=" in a)
    listen = int(flags["--web.listen-address"].rsplit(":", 1)[1])
    assert [c for _, c in _ports(prom)] == [listen]


def test_publishing_beyond_loopback_and_other_host_ports_are_one_variable_away(docker: Dockerfile) -> None:
    from cifar_serve.server.settings import settings_from_args

    env = {
        "PUBLISH_ADDRESS": "0.0.0.0",
        "GRPC_PORT": "50061",
        "HTTP_PORT": "8010",
        "METRICS_PORT": "9190",
        "PROMETHEUS_PORT": "9191",
        "CIFAR_SERVE_AUTH_TOKEN": "s3cret",
    }
    exposed = load_compose(env)["services"]
    for name in STACKS:
        svc = exposed[name]
        assert _publish_ips(svc) == {"0.0.0.0"}
        assert sorted(_ports(svc)) == [(8010, 8000), (9190, 9090), (50061, 50051)]
        # The token set on the host reaches the server, so an exposed server asks for it.
        assert settings_from_args(_argv(svc, docker)[1:], _container_env(svc, docker)).auth_token == "s3cret"
    assert _ports(exposed["prometheus"]) == [(9191, 9090)]
    # Unset, the token is empty: the server runs without one, as it does outside a container.
    for name in STACKS:
        svc = load_compose()["services"][name]
        assert settings_from_args(_argv(svc, docker)[1:], _container_env(svc, docker)).auth_token == ""


def test_the_image_drains_within_docker_stops_default_timeout(
    services: dict[str, dict[str, Any]], docker: Dockerfile
) -> None:
    from cifar_serve.server.settings import settings_from_args

    # `docker run IMAGE` then `docker stop`: SIGTERM (STOPSIGNAL), then SIGKILL after 10 s. The
    # image's drain must end before that, with a margin for the shutdown after the drain.
    assert docker.final.all("STOPSIGNAL")[-1].value[0] == "SIGTERM"
    image = settings_from_args(docker.exec_form("CMD"), docker.env())
    assert image.grace_period_s <= DOCKER_STOP_TIMEOUT_S - 2, image.grace_period_s
    for name in STACKS:
        svc = services[name]
        grace = settings_from_args(_argv(svc, docker)[1:], _container_env(svc, docker)).grace_period_s
        assert _duration_s(svc["stop_grace_period"]) >= grace + 2, name


def test_no_host_port_is_published_twice(services: dict[str, dict[str, Any]]) -> None:
    # The server variants are alternatives (one runs at a time); everything else may run together.
    variants = [n for n, s in services.items() if "cifar-serve" in _aliases(s)]
    assert set(variants) == {"server", "server-cpu"}
    for chosen in variants:
        running = [n for n in services if n not in variants or n == chosen]
        published = [h for n in running for h, _ in _ports(services[n])]
        assert len(published) == len(set(published)), f"with {chosen}: {sorted(published)}"


def test_every_container_command_is_a_real_script_with_real_flags(
    services: dict[str, dict[str, Any]], docker: Dockerfile
) -> None:
    for name, svc in services.items():
        if not _our_image(svc):
            continue
        argv = _argv(svc, docker)
        assert argv[0] in SCRIPTS, f"{name} runs {argv[0]!r}, not a console script of this project"
        _assert_flags_in_help(argv, _env_of(svc))
    # The image's own entrypoint and environment, as `docker run cifar-serve:cpu` runs them.
    _assert_flags_in_help(docker.exec_form("ENTRYPOINT") + docker.exec_form("CMD"), docker.env())


def test_server_settings_parse_exactly_as_in_the_container(
    services: dict[str, dict[str, Any]], docker: Dockerfile
) -> None:
    """Every server service's argv and environment pass the server's own validation."""
    from cifar_serve.server.settings import settings_from_args

    for name in ("server", "server-cpu"):
        svc = services[name]
        settings = settings_from_args(_argv(svc, docker)[1:], _container_env(svc, docker))
        assert settings.model_dir.startswith("/"), name


def test_export_service_runs_outside_a_container(
    tmp_path: Path, services: dict[str, dict[str, Any]], docker: Dockerfile, model_dir: Path
) -> None:
    svc = services["export"]
    fs = ContainerFS(docker, {"artifacts": model_dir})
    volumes = {}
    for m in _mounts(svc):
        assert m.named
        volumes[m.source] = tmp_path / "volumes" / m.source
        volumes[m.source].mkdir(parents=True)
        fs.mount(m.target, volumes[m.source])
    argv = _argv(svc, docker)
    host_argv = fs.argv(argv)
    for arg in argv[1:]:
        if arg.startswith("/") and fs.host(arg) != arg:
            continue
        assert not arg.startswith("/"), f"export names {arg}, which neither the image nor a volume holds"
    env = {k: fs.host(v) for k, v in _container_env(svc, docker).items()}
    workdir = tmp_path / "workdir"  # not the repository: relative paths would not resolve there either
    workdir.mkdir()
    proc = _run(host_argv, env, cwd=workdir, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(host_argv)} failed:\n{proc.stdout}\n{proc.stderr}"
    out = Path(fs.host(argv[argv.index("--out") + 1]))
    assert out.is_relative_to(tmp_path / "volumes")
    manifest = json.loads((out / "manifest.json").read_text())
    for art in manifest["artifacts"].values():
        assert (out / art["path"]).is_file()
    assert manifest["parity"]["images"] > 0, "the export in the container checks parity"


# =============================================================================================
# Dockerfile
# =============================================================================================


def test_dockerfile_is_multi_stage_from_a_pinned_base(docker: Dockerfile) -> None:
    assert len(docker.stages) >= 2
    names = set()
    for stage in docker.stages:
        base = docker.resolve(stage.base)
        if base in names:
            continue  # built on an earlier stage
        assert "$" not in base, f"FROM {stage.base}: unresolved"
        image, _, tag = base.partition("@")[0].rpartition(":")
        assert image and tag, f"FROM {base}: no tag"
        assert tag != "latest" and re.match(r"\d+\.\d+", tag), f"FROM {base}: tag is not a pinned version"
        if stage.name:
            names.add(stage.name)
    assert docker.resolve(docker.final.base).startswith("python:3.11")


def test_final_stage_runs_as_a_non_root_user(docker: Dockerfile) -> None:
    users = docker.final.all("USER")
    assert users, "the final stage sets no USER, so it runs as root"
    user = users[-1].value[0].split(":")[0].strip()
    assert user not in ("root", "0"), user
    created = " ".join(docker.runs(docker.final))
    assert re.search(rf"useradd\b.*\b{re.escape(user)}\b", created), f"user {user} is never created"
    # useradd warns when a --system account gets a uid above SYS_UID_MAX (999), and a regular
    # account's uid must lie in UID_MIN..UID_MAX (Debian: 1000..60000).
    useradd = re.search(r"useradd\b((?:\s+-{1,2}[\w-]+(?:[ =][^-\s]\S*)?)*)", created)
    assert useradd, created
    uid = re.search(r"(?:--uid|-u)[ =](\d+)", useradd.group(1))
    if uid:
        allowed = range(0, 1000) if re.search(r"(?:--system|-r)\b", useradd.group(1)) else range(1000, 60001)
        assert int(uid.group(1)) in allowed, useradd.group(0)


def test_image_entrypoint_ports_and_environment(docker: Dockerfile) -> None:
    from cifar_serve.server.settings import Settings

    assert docker.exec_form("ENTRYPOINT") == ["cifar-serve"]
    exposed = {int(p.split("/")[0]) for c in docker.final.all("EXPOSE") for p in c.value}
    assert exposed == {Settings.port, Settings.http_port, Settings.metrics_port}
    env = docker.env()
    assert env["CIFAR_SERVE_HOST"] == "0.0.0.0"
    # The image's default model folder is the one exported at build time.
    fs = ContainerFS(docker, {})
    copied_from = {c.dest.rstrip("/"): c.options.get("from") for c in docker.copies(docker.final)}
    assert copied_from.get(env["CIFAR_SERVE_MODEL_DIR"].rstrip("/")), "the image's model dir is not copied in"
    assert fs.host("/app/deploy/healthcheck.py") == str(REPO / "deploy" / "healthcheck.py")


def test_artifacts_are_exported_at_build_time_from_the_shipped_weights(docker: Dockerfile) -> None:
    found = []
    for stage in docker.stages:
        copies = docker.copies(stage)
        for run in stage.all("RUN"):
            m = re.search(r"\bcifar-export\b(.*?)(?:&&|;|$)", " ".join(run.value))
            if not m:
                continue
            argv = ["cifar-export", *shlex.split(m.group(1))]
            _assert_flags_in_help(argv)
            workdir = docker.workdir(stage, upto=run)
            copied = {c.dest: c.sources for c in copies}
            for flag, shipped in (("--checkpoint", SHIPPED_WEIGHTS), ("--parity-data", SHIPPED_SAMPLE)):
                path = posixpath.join(workdir, argv[argv.index(flag) + 1])
                assert copied.get(path) == [shipped], f"the build's {flag} is not {shipped}"
            assert "--no-parity" not in argv, "the build must check parity"
            found.append((stage.name, argv[argv.index("--out") + 1]))
    assert found, "no RUN cifar-export in the Dockerfile"
    final_copies = [(c.options.get("from"), src) for c in docker.copies(docker.final) for src in c.sources]
    assert any(pair in final_copies for pair in found), "the final stage does not copy the exported artifacts"


def test_volume_mount_points_belong_to_the_image_user(
    services: dict[str, dict[str, Any]], docker: Dockerfile
) -> None:
    # A new named volume takes the ownership of the image's folder it is mounted on: the
    # non-root user can only write to volumes whose mount points the image created for it.
    runs = " ".join(docker.runs(docker.final))
    chowned = re.findall(r"chown\s+(?:-R\s+)?\S+\s+((?:/\S+\s*)+)", runs)
    owned = {p for group in chowned for p in group.split()}
    for name, svc in services.items():
        if _our_image(svc):
            for m in _mounts(svc):
                if m.named:
                    assert m.target in owned, f"{name}: mount point {m.target} is not the image user's"


def test_dependencies_are_pinned(docker: Dockerfile) -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    deps = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    for req in deps:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in {CONSTRAINTS.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs pinned {pins[name]}"
    builds = " ".join(docker.runs())
    assert "-c deploy/constraints.txt" in builds


@pytest.mark.parametrize("variant", ["cpu", "cuda", "cu126"])
def test_dependency_install_step_runs_in_sh(tmp_path: Path, docker: Dockerfile, variant: str) -> None:
    """The build's dependency RUN, run by /bin/sh here with a pip that only records its calls."""
    [run] = [r for r in docker.runs() if "tomllib" in r]
    for src in ("pyproject.toml", "deploy/constraints.txt"):  # what the stage copied before it
        (tmp_path / src).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / src, tmp_path / src)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    log = tmp_path / "pip.log"
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(log))}\n')
    (bin_dir / "pip").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TORCH_VARIANT": variant}
    proc = subprocess.run(
        ["/bin/sh", "-e", "-c", run.replace("/tmp/", f"{scratch}/")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[-1] == f"install -c deploy/constraints.txt -r {scratch}/requirements.txt"
    assert (scratch / "requirements.txt").read_text().splitlines() == PYPROJECT["project"]["dependencies"]
    if variant == "cuda":  # PyPI's Linux torch wheels are the CUDA build
        assert len(calls) == 1
        return
    index = f"https://download.pytorch.org/whl/{variant}"
    assert calls[0] == f"install --no-deps --index-url {index} -r {scratch}/torch.txt"
    pins = (scratch / "torch.txt").read_text().split()
    assert sorted(p.split("==")[0] for p in pins) == ["torch", "torchvision"]
    assert set(pins) <= set(PYPROJECT["project"]["dependencies"])


# =============================================================================================
# .dockerignore
# =============================================================================================


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            else:
                c = pattern[i]
                rx += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
                i += 1
        out.append((negate, re.compile(rx + "$")))
    return out


def _ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for negate, rx in patterns:
        if any(rx.match(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_lets_every_copy_source_through(docker: Dockerfile) -> None:
    patterns = _ignore_patterns()
    for stage in docker.stages:
        for c in docker.copies(stage):
            if "from" in c.options:
                continue
            for src in c.sources:
                path = REPO / src
                assert path.exists(), f"COPY {src}: missing from the project"
                files = (
                    [path]
                    if path.is_file()
                    else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                )
                assert files, f"COPY {src}: empty"
                for f in files:
                    rel = f.relative_to(REPO).as_posix()
                    assert not _ignored(rel, patterns), f"COPY {src}: .dockerignore drops {rel}"


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = _ignore_patterns()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "artifacts/manifest.json",
        "runs/train/last.pt",
        "export/__pycache__/cli.cpython-311.pyc",
        "tests/test_deploy.py",
        "docker-compose.yml",
    ):
        assert _ignored(path, patterns), path
    assert not _ignored("models/resnet18_cifar10.pt", patterns)


# =============================================================================================
# Health check: the same command in the Dockerfile and compose, and it works
# =============================================================================================


def test_compose_healthcheck_is_the_dockerfile_healthcheck(
    services: dict[str, dict[str, Any]], docker: Dockerfile
) -> None:
    options, cmd = docker.healthcheck()
    translate = {
        "interval": "interval",
        "timeout": "timeout",
        "start-period": "start_period",
        "retries": "retries",
    }
    for name, svc in services.items():
        if not _our_image(svc):
            continue
        hc = svc.get("healthcheck") or {}
        if _argv(svc, docker)[0] != "cifar-serve":
            # One-shot jobs: the image's server health check would only report them unhealthy.
            assert hc.get("disable") is True, f"{name} should disable the server health check"
            continue
        assert hc["test"] == ["CMD", *cmd], f"{name}: {hc['test']} is not the Dockerfile's {cmd}"
        for docker_opt, compose_opt in translate.items():
            assert str(hc[compose_opt]) == options[docker_opt], f"{name}: {compose_opt} differs"


def _healthcheck_module() -> Any:
    spec = importlib.util.spec_from_file_location("cifar_healthcheck", REPO / "deploy" / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


def test_healthcheck_asks_the_port_the_server_listens_on(
    services: dict[str, dict[str, Any]], docker: Dockerfile, tmp_path: Path
) -> None:
    from cifar_serve.server.settings import settings_from_args

    module = _healthcheck_module()
    for name in ("server", "server-cpu"):
        svc = services[name]
        env = _container_env(svc, docker)
        settings = settings_from_args(_argv(svc, docker)[1:], env)
        target = module.find_target(proc=tmp_path / "no-proc", environ=env)
        assert target.address == f"127.0.0.1:{settings.port}", name


def test_healthcheck_command_against_a_real_server(
    tmp_path: Path, docker: Dockerfile, model_dir: Path, make_settings: Any
) -> None:
    from cifar_serve.server.launch import ServerThread

    _, cmd = docker.healthcheck()
    argv = ContainerFS(docker, {}).argv(cmd)
    assert Path(argv[1]).is_file(), argv
    srv = ServerThread(make_settings(model_dir, port=0)).start()
    # As in the container: the server's own variables, a wildcard host checked on loopback. No
    # cifar-serve process is visible (this server is a thread), so the check reads its own.
    env = {
        "CIFAR_SERVE_HOST": "0.0.0.0",
        "CIFAR_SERVE_PORT": str(srv.port),
        "CIFAR_SERVE_HEALTHCHECK_PROC": str(tmp_path / "no-proc"),
    }
    try:
        ok = _run(argv, env, cwd=tmp_path, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert "SERVING" in ok.stdout
    finally:
        srv.stop()
    down = _run(argv, env, cwd=tmp_path, timeout=60)
    assert down.returncode != 0, "the health check passed with the server stopped"
    closed = _run(argv, {**env, "CIFAR_SERVE_PORT": str(_free_port())}, cwd=tmp_path, timeout=60)
    assert closed.returncode != 0, "the health check passed with nothing listening"
    assert "unhealthy" in closed.stderr


def test_healthcheck_follows_the_servers_own_command_line(
    tmp_path: Path, docker: Dockerfile, model_dir: Path
) -> None:
    """``docker run IMAGE --port 50061``: the check asks the port the server process was given."""
    _, cmd = docker.healthcheck()
    argv = ContainerFS(docker, {}).argv(cmd)
    port = _free_port()
    env = {**os.environ, "CIFAR_SERVE_HOST": "0.0.0.0", "CIFAR_SERVE_PORT": str(_free_port())}
    server = subprocess.Popen(
        [
            _program("cifar-serve"),
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            "--model-dir",
            str(model_dir),
            "--grace-period-s",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # This host may run other servers: the check sees only this one, as in its own container.
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / str(server.pid)).symlink_to(f"/proc/{server.pid}")
    check_env = {"CIFAR_SERVE_PORT": env["CIFAR_SERVE_PORT"], "CIFAR_SERVE_HEALTHCHECK_PROC": str(proc)}
    try:
        assert server.stdout is not None
        log = []
        for line in server.stdout:  # the server logs "serving ..." once its port answers
            log.append(line)
            if "serving" in line:
                break
        assert server.poll() is None, "".join(log)
        ok = _run(argv, check_env, cwd=tmp_path, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == f"127.0.0.1:{port}: SERVING"
    finally:
        server.terminate()
        server.communicate(timeout=60)
    gone = _run(argv, check_env, cwd=tmp_path, timeout=60)
    assert gone.returncode != 0 and "unhealthy" in gone.stderr


def test_healthcheck_speaks_tls_to_a_tls_server(
    tmp_path: Path, docker: Dockerfile, model_dir: Path, make_settings: Any, self_signed: Any
) -> None:
    pytest.importorskip("cryptography")
    from cifar_serve.server.launch import ServerThread

    _, cmd = docker.healthcheck()
    argv = ContainerFS(docker, {}).argv(cmd)
    cert, key = self_signed(tmp_path, "cifar-serve.internal", ca=True)
    srv = ServerThread(make_settings(model_dir, port=0, tls_cert=str(cert), tls_key=str(key))).start()
    env = {
        "CIFAR_SERVE_HOST": "0.0.0.0",
        "CIFAR_SERVE_PORT": str(srv.port),
        "CIFAR_SERVE_TLS_CERT": str(cert),
        "CIFAR_SERVE_HEALTHCHECK_PROC": str(tmp_path / "no-proc"),
    }
    try:
        # The certificate names cifar-serve.internal, not 127.0.0.1: verified, so refused ...
        wrong_name = _run(argv, env, cwd=tmp_path, timeout=60)
        assert wrong_name.returncode == 2 and "unhealthy" in wrong_name.stderr
        # ... until the check is told the name the certificate carries.
        ok = _run(argv, {**env, "CIFAR_SERVE_HEALTHCHECK_TLS_NAME": "cifar-serve.internal"}, cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert "SERVING" in ok.stdout
    finally:
        srv.stop()
    # Mutual TLS: the server asks for a client certificate, which the check presents when given one.
    client_cert, client_key = self_signed(tmp_path / "client", "healthcheck", ca=True)
    settings = make_settings(
        model_dir, port=0, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(client_cert)
    )
    srv = ServerThread(settings).start()
    env = {
        **env,
        "CIFAR_SERVE_PORT": str(srv.port),
        "CIFAR_SERVE_HEALTHCHECK_TLS_NAME": "cifar-serve.internal",
    }
    try:
        anonymous = _run(argv, env, cwd=tmp_path, timeout=60)
        assert anonymous.returncode == 2 and "unhealthy" in anonymous.stderr
        client = {
            "CIFAR_SERVE_HEALTHCHECK_TLS_CERT": str(client_cert),
            "CIFAR_SERVE_HEALTHCHECK_TLS_KEY": str(client_key),
        }
        ok = _run(argv, {**env, **client}, cwd=tmp_path, timeout=60)
        assert ok.returncode == 0, ok.stderr
    finally:
        srv.stop()


def test_healthcheck_reads_proc_entries(tmp_path: Path) -> None:
    module = _healthcheck_module()

    def process(pid: int, argv: list[str], env: dict[str, str]) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (tmp_path / str(pid) / "environ").write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in env.items()))

    process(1, ["/usr/bin/tini", "--", "sh"], {})
    process(
        7,
        ["/opt/venv/bin/python", "/opt/venv/bin/cifar-serve", "--port=50061", "--host", "::"],
        {"CIFAR_SERVE_PORT": "1"},
    )
    target = module.find_target(proc=tmp_path, environ={"CIFAR_SERVE_PORT": "2"})
    assert (target.address, target.source) == ("127.0.0.1:50061", "pid 7")
    (tmp_path / "7" / "cmdline").write_bytes(b"python\0-m\0cifar_serve.server\0--host\0fd00::1\0")
    assert module.find_target(proc=tmp_path, environ={}).address == "[fd00::1]:1"
    # Settings the server refuses (it is exiting): the next process, then the environment.
    (tmp_path / "7" / "cmdline").write_bytes(b"cifar-serve\0--max-batch-size\x000\0")
    assert module.find_target(proc=tmp_path, environ={"CIFAR_SERVE_PORT": "2"}).address == "127.0.0.1:2"


# =============================================================================================
# Prometheus
# =============================================================================================


def test_prometheus_scrapes_the_servers_metrics_endpoint(
    services: dict[str, dict[str, Any]], docker: Dockerfile
) -> None:
    from cifar_serve.server.settings import settings_from_args

    prom = services["prometheus"]
    flags = dict(a.split("=", 1) for a in prom["command"] if "=" in a)
    config_mounts = [m for m in _mounts(prom) if m.target == flags["--config.file"]]
    assert [m.source for m in config_mounts] == ["./deploy/prometheus.yml"]
    assert config_mounts[0].read_only
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets
    metrics_ports: dict[str, set[int]] = {}
    for name in ("server", "server-cpu"):
        svc = services[name]
        port = settings_from_args(_argv(svc, docker)[1:], _container_env(svc, docker)).metrics_port
        for host in {name, *_aliases(svc)}:
            metrics_ports.setdefault(host, set()).add(port)
    for target in targets:
        host, _, port = target.rpartition(":")
        assert host in metrics_ports, f"Prometheus target {target} is not a server service or alias"
        assert metrics_ports[host] == {int(port)}, f"{target}: the metrics port is {metrics_ports[host]}"
    hosts = {t.rpartition(":")[0] for t in targets}
    for variant in ("server", "server-cpu"):
        assert hosts & {variant, *_aliases(services[variant])}, f"Prometheus never scrapes {variant}"
