"""The container images: Dockerfile structure, then the exact CMD run from the repo venv.

No Docker engine runs here, so each Dockerfile is parsed as text (logical lines with
backslash continuations, comments skipped, JSON exec forms decoded) and its final stage's
``ENV`` and ``CMD`` are replayed locally: ``/opt/jennah/bin`` in ``PATH`` becomes the
repo's ``.venv/bin``, ``HOST`` is narrowed to 127.0.0.1, ``PORT`` is a free port (as Cloud
Run would set it) and ``JENNAH_HOME`` a temp dir. The worker runs with a worker token
(not dev mode), the gateway points at it through ``WORKER_ENDPOINTS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(parts[0], name))
            continue
        assert stages, f"{keyword} before any FROM"
        stages[-1].instructions.append((keyword, args))
    return stages


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


def dockerfile(role: str) -> list[Stage]:
    return parse((Path(REPO) / f"Dockerfile.{role}").read_text())


def test_parser_handles_continuations_and_forms() -> None:
    stages = parse('FROM a:1 AS b\nRUN x \\\n  # note\n  && y\nFROM c\n'
                   'ENV A=1 \\\n    B="two words"\nENV C 3\nCMD ["p", "q"]\n')
    assert [(s.image, s.name) for s in stages] == [("a:1", "b"), ("c", "")]
    assert stages[0].all("RUN") == ["x && y"]
    assert env_of(stages[1]) == {"A": "1", "B": "two words", "C": "3"}
    assert exec_form(stages[1].all("CMD")[0]) == ["p", "q"]


@pytest.mark.parametrize("role", sorted(ROLES))
def test_dockerfile_structure(role: str) -> None:
    stages = dockerfile(role)
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    build, final = stages[0], stages[-1]
    assert final.image == "python:3.11-slim"
    assert build.name, "the build stage is named so the final stage can copy from it"
    # The build stage makes the venv; the final stage copies that venv and nothing else.
    assert any("python -m venv /opt/jennah" in r for r in build.all("RUN"))
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
    """A JENNAH_API_KEYS_FILE (gateway/keys.py format) with one key for tenant ``acme``."""
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
