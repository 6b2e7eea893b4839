"""The container images without an engine: Dockerfile structure, the image build helpers
(``deploy/images/``), then the exact CMD run from the repo venv.

Real containers of the built images are tested by ``tests/images/`` (``make image-test``).
Here each Dockerfile is parsed as text (logical lines with backslash continuations,
comments skipped, JSON exec forms decoded) and its final stage's ``ENV`` and ``CMD`` are
replayed locally: ``/opt/jennah/bin`` in ``PATH`` becomes the repo's ``.venv/bin``,
``HOST`` is narrowed to 127.0.0.1, ``PORT`` is a free port (as Cloud Run would set it) and
``JENNAH_HOME`` a temp dir. The worker runs with a worker token (not dev mode), the
gateway points at it through ``WORKER_ENDPOINTS``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO, call, free_port, stop, wait_http

pytestmark = pytest.mark.timeout(60)

VENV_BIN = Path(REPO) / ".venv" / "bin"
ROLES = {"worker": 8081, "gateway": 8080}


@dataclass
class Stage:
    image: str
    name: str = ""
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def logical_lines(text: str) -> list[str]:
    """Dockerfile lines with continuations joined and comment lines dropped."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def parse(text: str) -> list[Stage]:
    """The stages; the global ``ARG``s before the first ``FROM`` are :func:`global_args`."""
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            continue
        if keyword == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(parts[0], name))
            continue
        assert stages, f"{keyword} before any FROM"
        stages[-1].instructions.append((keyword, args))
    return stages


def arg_defaults(args: list[str]) -> dict[str, str]:
    """``ARG name=default`` (or a bare ``ARG name``, default "") as a dict."""
    return {name: value for name, _, value in (a.partition("=") for a in args)}


def global_args(text: str) -> dict[str, str]:
    """The ``ARG``s declared before the first ``FROM`` (usable in ``FROM`` lines)."""
    out: list[str] = []
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            break
        if keyword.upper() == "ARG":
            out.append(args.strip())
    return arg_defaults(out)


def env_of(stage: Stage) -> dict[str, str]:
    """The ``ENV key=value ...`` pairs of a stage (the legacy ``ENV key value`` too)."""
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        words = shlex.split(args)
        if words and "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _dockerfile_text(role: str) -> str:
    return (Path(REPO) / f"Dockerfile.{role}").read_text()


def dockerfile(role: str) -> list[Stage]:
    return parse(_dockerfile_text(role))


def test_parser_handles_continuations_and_forms() -> None:
    text = ('ARG IMG=a:1\nARG BARE\nFROM ${IMG} AS b\nARG X=y\nRUN x \\\n  # note\n  && y\n'
            'FROM c\nENV A=1 \\\n    B="two words"\nENV C 3\nCMD ["p", "q"]\n')
    stages = parse(text)
    assert global_args(text) == {"IMG": "a:1", "BARE": ""}
    assert [(s.image, s.name) for s in stages] == [("${IMG}", "b"), ("c", "")]
    assert arg_defaults(stages[0].all("ARG")) == {"X": "y"}
    assert stages[0].all("RUN") == ["x && y"]
    assert env_of(stages[1]) == {"A": "1", "B": "two words", "C": "3"}
    assert exec_form(stages[1].all("CMD")[0]) == ["p", "q"]


@pytest.mark.parametrize("role", sorted(ROLES))
def test_dockerfile_structure(role: str) -> None:
    stages = dockerfile(role)
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    build, final = stages[0], stages[-1]
    # Both stages start from BASE_IMAGE, python:3.11-slim unless the build says otherwise.
    assert global_args(_dockerfile_text(role)) == {"BASE_IMAGE": "python:3.11-slim"}
    assert build.image == final.image == "${BASE_IMAGE}"
    assert build.name, "the build stage is named so the final stage can copy from it"
    # The build stage makes the venv; the final stage copies that venv and nothing else.
    assert any("python3 -m venv /opt/jennah" in r for r in build.all("RUN"))
    copies = final.all("COPY")
    assert copies == [f"--from={build.name} /opt/jennah /opt/jennah"], copies
    assert not any("gcc" in r for r in final.all("RUN")), "no compiler in the runtime image"

    users = final.all("USER")
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    if user.isdigit():  # the numeric uid exists in the image
        assert any(f"--uid {user}" in r for r in final.all("RUN"))
    # USER comes after every RUN (nothing after it runs as root).
    kinds = [kw for kw, _ in final.instructions]
    assert max(i for i, k in enumerate(kinds) if k == "RUN") < kinds.index("USER")

    env = env_of(final)
    assert env["HOST"] == "0.0.0.0"
    assert "PORT" not in env, "PORT is Cloud Run's to set; the role's own port is the default"
    assert env[f"{role.upper()}_PORT"] == str(ROLES[role])
    assert env["JENNAH_LOG_FORMAT"] == "json"
    assert env["JENNAH_SERVER"] in ("uvicorn", "hypercorn")
    assert env["PATH"].startswith("/opt/jennah/bin:")
    assert not any(re.search(r"TOKEN|SECRET|PASSWORD|KEY", k) for k in env), "no secrets baked in"
    assert final.all("EXPOSE") == [str(ROLES[role])]

    cmds = final.all("CMD")
    assert len(cmds) == 1
    assert exec_form(cmds[0]) == ["jennah", role]
    health = final.all("HEALTHCHECK")
    assert health and " CMD [" in f" {health[0]}"


def _packages() -> list[str]:
    """The top-level packages pyproject.toml ships (``[tool.setuptools.packages.find]``)."""
    with (Path(REPO) / "pyproject.toml").open("rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    return [pattern.rstrip("*") for pattern in include]


@pytest.mark.parametrize("role", sorted(ROLES))
def test_dockerfile_builds_offline_from_a_wheelhouse(role: str) -> None:
    text = _dockerfile_text(role)
    # BuildKit would pull a `# syntax=` frontend image: an offline build could not start.
    assert not any(ln.lower().startswith("# syntax") for ln in text.splitlines())
    build = dockerfile(role)[0]
    args = arg_defaults(build.all("ARG"))
    wheelhouse = Path(REPO) / args["WHEELHOUSE"]
    # The default wheelhouse exists (COPY needs it) and holds no wheel: install from the index.
    assert wheelhouse.is_dir() and not list(wheelhouse.glob("*.whl"))
    assert build.all("COPY")[0] == "${WHEELHOUSE} /wheels"
    runs = build.all("RUN")
    assert all("--no-index --find-links=/wheels" in r for r in runs), "every pip uses it"
    assert "gcc" in runs[0] and "binutils" in runs[0], "the index path compiles and strips"
    assert "import crcmod._crcfunext" in runs[0] and "crcmod._crcfunext" in runs[-1]
    assert "pip uninstall -y -q pip setuptools wheel" in runs[-1], "no pip at runtime"
    assert '".[$EXTRAS]"' in runs[-1] and "pip check" in runs[-1]
    # Every package pyproject.toml ships is copied in (a forgotten one fails the import).
    copied = {c.split()[0] for c in build.all("COPY")}
    assert set(_packages()) <= copied, set(_packages()) - copied
    # Only the dependencies precede the source: a code change rebuilds the last layer only.
    order = [(kw, a) for kw, a in build.instructions if kw in ("COPY", "RUN")]
    first_source = next(i for i, (kw, a) in enumerate(order) if a.startswith("README.md"))
    assert [kw for kw, _ in order[:first_source]] == ["COPY", "COPY", "RUN"]
    # The extras exist, and the worker has every provider and store (pyvoy aside: size).
    with (Path(REPO) / "pyproject.toml").open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    wanted = set(args["EXTRAS"].split(","))
    assert wanted <= set(extras), wanted - set(extras)
    if role == "worker":
        assert wanted == set(extras) - {"all", "dev", "pyvoy"}


def test_dockerignore_sends_the_wheelhouse_and_the_sources() -> None:
    lines = [ln.strip() for ln in (Path(REPO) / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]  # fmt: skip
    assert ".cache" in lines and "!.cache/images/wheelhouse" in lines
    assert lines.index(".cache") < lines.index("!.cache/images/wheelhouse"), "order matters"
    assert not set(lines) & {*_packages(), "deploy", "deploy/images", "README.md"}


@pytest.fixture(scope="module")
def image_tools() -> Iterator[dict[str, ModuleType]]:
    """deploy/images/*.py, loaded from their files under names of their own (``build`` is
    also a PyPI package); ``build.py`` finds ``elf`` as the script does, next to it."""
    folder = Path(REPO) / "deploy" / "images"
    saved_path = list(sys.path)
    loaded: dict[str, ModuleType] = {}
    try:
        for name in ("elf", "requirements", "build"):
            spec = importlib.util.spec_from_file_location(
                "elf" if name == "elf" else f"_image_{name}", folder / f"{name}.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            loaded[name] = module
        yield loaded
    finally:
        sys.path[:] = saved_path
        for name in ("elf", "_image_requirements", "_image_build"):
            sys.modules.pop(name, None)


def test_requirements_expand_the_extras(image_tools: dict[str, ModuleType]) -> None:
    requirements = image_tools["requirements"].requirements
    project = {"project": {"name": "Jennah", "dependencies": ["a>=1", "b"],
                           "optional-dependencies": {"x": ["c"], "y": ["b", "d<2"],
                                                     "all": ["jennah[x, y]", "e"]}}}  # fmt: skip
    assert requirements(project, []) == ["a>=1", "b"]
    assert requirements(project, ["all"]) == ["a>=1", "b", "c", "d<2", "e"]
    assert requirements(project, ["y", "all"]) == ["a>=1", "b", "d<2", "c", "e"]
    with pytest.raises(SystemExit, match="no extra 'z'"):
        requirements(project, ["z"])


def test_strip_wheel_strips_symbols_and_rewrites_record(
    image_tools: dict[str, ModuleType], tmp_path: Path
) -> None:
    build_py, elf = image_tools["build"], image_tools["elf"]
    if shutil.which("strip") is None or shutil.which("gcc") is None:
        pytest.skip("needs gcc and strip (binutils)")
    src = tmp_path / "m.c"
    src.write_text("int answer(void) { return 42; }\n")
    so = tmp_path / "m.so"
    subprocess.run(["gcc", "-g", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    data = so.read_bytes()
    assert elf.has_symbols(data)
    wheel = tmp_path / "pkg-1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/_m.so", data)
        zf.writestr("pkg.libs/libbundled.so.1", data)  # patchelf'd by auditwheel: kept
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg-1.0.dist-info/RECORD", "stale\n")
    assert build_py.strip_wheel(wheel) is True
    with zipfile.ZipFile(wheel) as zf:
        stripped = zf.read("pkg/_m.so")
        assert not elf.has_symbols(stripped) and len(stripped) < len(data)
        assert zf.read("pkg.libs/libbundled.so.1") == data
        record = zf.read("pkg-1.0-dist-info/RECORD".replace("-dist", ".dist")).decode()
        rows = {r.split(",")[0]: r.split(",", 1)[1] for r in record.splitlines()}
        for name in ("pkg/_m.so", "pkg.libs/libbundled.so.1", "pkg/__init__.py"):
            assert rows[name] == f"{build_py._record_hash(zf.read(name))},{len(zf.read(name))}"
        assert rows["pkg-1.0.dist-info/RECORD"] == ","
    assert build_py.strip_wheel(wheel) is False, "nothing left to strip"
    assert not elf.has_symbols(b"not an ELF file at all" * 4)


def _image_env(role: str, overrides: dict[str, str]) -> dict[str, str]:
    """The process environment the image would give ``role``, replayed on this machine."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JENNAH_", "WORKER_", "GATEWAY_", "OTEL_"))
           and k not in ("PORT", "HOST", "DB_PATH", "WAL_DIR", "ARCHIVE_DIR")}
    for key, value in env_of(dockerfile(role)[-1]).items():
        value = value.replace("/opt/jennah/bin", str(VENV_BIN))
        env[key] = value.replace("$PATH", os.environ.get("PATH", ""))
    env.update(overrides)
    # Not from the image: should a process abort, Python prints every thread's stack.
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def _run_cmd(role: str, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    argv = exec_form(dockerfile(role)[-1].all("CMD")[0])
    assert shutil.which(argv[0], path=env["PATH"]) == str(VENV_BIN / argv[0])
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


API_KEY = "jk_0123456789ab_" + "s" * 43


def _key_file(tmp_path: Path) -> Path:
    """A JENNAH_API_KEYS_FILE (gateway/keyfile.py format) with one key for tenant ``acme``."""
    path = tmp_path / "keys.json"
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    path.write_text(json.dumps({"version": 1, "identities": {}, "keys": [
        {"id": "0123456789ab", "tenant": "acme", "hash": f"sha256:{digest}", "label": "test",
         "created_at": "2026-12-01T00:00:00Z", "revoked_at": None}]}))
    return path


def _json_lines(path: Path) -> list[dict[str, object]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("{")]
    return [json.loads(ln) for ln in lines]


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_image_cmds_serve_health_on_port(tmp_path: Path, server: str) -> None:
    started = time.monotonic()
    token = "image-test-token-0123456789"
    wport, gport = free_port(), free_port()
    worker_env = _image_env("worker", {
        "HOST": "127.0.0.1", "PORT": str(wport), "JENNAH_HOME": str(tmp_path / "home"),
        "DB_PATH": str(tmp_path / "jennah.db"), "JENNAH_WORKER_TOKEN": token,
        "WORKER_ID": "img-w1", "BATCH_PROVIDER": "dry", "JENNAH_SERVER": server,
    })
    worker = _run_cmd("worker", worker_env, tmp_path, tmp_path / "worker.log")
    gateway = None
    try:
        wait_http(f"http://127.0.0.1:{wport}/health", timeout=20, proc=worker)
        wait_http(f"http://127.0.0.1:{wport}/ready", timeout=10, proc=worker)
        gateway_env = _image_env("gateway", {
            "HOST": "127.0.0.1", "PORT": str(gport), "JENNAH_HOME": str(tmp_path / "home"),
            "JENNAH_WORKER_TOKEN": token, "WORKER_ENDPOINTS": f"http://127.0.0.1:{wport}",
            "JENNAH_SERVER": server, "JENNAH_API_KEYS_FILE": str(_key_file(tmp_path)),
        })
        gateway = _run_cmd("gateway", gateway_env, tmp_path, tmp_path / "gateway.log")
        wait_http(f"http://127.0.0.1:{gport}/health", timeout=20, proc=gateway)
        # /ready: the gateway reached the worker's /health through WORKER_ENDPOINTS.
        wait_http(f"http://127.0.0.1:{gport}/ready", timeout=10, proc=gateway)
        # One real call: API key at the gateway, worker token to the worker.
        status, body = call(f"http://127.0.0.1:{gport}", "SubmitJob",
                            {"image_uri": "busybox", "commands": ["true"]},
                            {"Authorization": f"Bearer {API_KEY}"})
        assert status == 200, body
        assert body["workerId"] == "img-w1"
    finally:
        if gateway is not None:
            stop(gateway)
        stop(worker)
    # A clean stop: uvicorn re-raises the SIGTERM it handled after draining (-15),
    # hypercorn returns 0; a crash or a kill after the timeout would be anything else.
    def tail(name: str) -> str:  # the evidence, should a process die of something else
        return (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:]

    assert worker.returncode in (0, -15), tail("worker")
    assert gateway is not None and gateway.returncode in (0, -15), tail("gateway")
    # JENNAH_LOG_FORMAT=json from the image: the shutdown line is a structured entry.
    entries = _json_lines(tmp_path / "worker.log")
    assert any(e.get("worker_id") == "img-w1" and e.get("severity") for e in entries), entries
    assert token not in (tmp_path / "worker.log").read_text()
    assert time.monotonic() - started < 30
