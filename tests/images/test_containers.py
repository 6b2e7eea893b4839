"""The built images in real containers: what ``docs/deploy.md`` promises of them.

Run by ``make image-test`` (``deploy/images/build.py test``) against ``jennah-worker:local``
and ``jennah-gateway:local`` (``JENNAH_WORKER_IMAGE`` / ``JENNAH_GATEWAY_IMAGE`` name
others). Without a Docker engine or the images these tests skip loudly, and fail under
``CI=true``.

Every container runs as Cloud Run would run it, but on this host: ``--network host`` (the
engine may have no bridge network), ``HOST=127.0.0.1`` and a free ``PORT``,
``--read-only`` with only ``JENNAH_HOME`` writable (a tmpfs, or a host directory that the
workers share, as every worker of a host shares the local provider's directory). Stores:
a private PostgreSQL server (``tests/fixtures/postgres.py``), or SQLite in the shared
home. The gateway authenticates with API keys from a read-only mounted key file, as the
Secret Manager mount of ``docs/deploy.md`` provides it.

The local provider runs each job as processes inside the worker container that
submitted it, so a worker container that stops or dies takes its running jobs with it:
the new owner finds them lost and fails them (``FAILURE_CLASS_INFRASTRUCTURE``), never
running them twice. With a cloud provider they keep running at the provider.

Measured figures (hand-over times, image sizes) are appended to ``JENNAH_IMAGE_REPORT``
when it names a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.deps import missing_dependency
from tests.helpers import SERVICE, call, free_port

pytestmark = [pytest.mark.images, pytest.mark.timeout(240)]

WORKER_IMAGE = os.environ.get("JENNAH_WORKER_IMAGE", "jennah-worker:local")
GATEWAY_IMAGE = os.environ.get("JENNAH_GATEWAY_IMAGE", "jennah-gateway:local")
IMAGES = {"worker": WORKER_IMAGE, "gateway": GATEWAY_IMAGE}
MAX_IMAGE_BYTES = 300 * 1000 * 1000
UID = 10001
HOME = "/var/lib/jennah"  # JENNAH_HOME in both images
KEYS_PATH = "/etc/jennah/keys/keys.json"  # where docs/deploy.md mounts the key file
TOKEN = "image-test-worker-token-" + "x" * 16
CLOUD_RUN_STOP_SECONDS = 10.0  # SIGTERM, then SIGKILL 10 s later
LEASE_TTL = 3.0
CLAIM_INTERVAL = 1.0
TERMINAL = {"JOB_STATUS_COMPLETED", "JOB_STATUS_FAILED", "JOB_STATUS_CANCELLED"}
LABEL = "org.jennah.image-test"


def report(line: str) -> None:
    """Print a measured figure and add it to the report file, if one is named."""
    print(line)
    path = os.environ.get("JENNAH_IMAGE_REPORT", "").strip()
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


# --- the engine and the containers --------------------------------------------------------


@dataclass
class Container:
    engine: Engine
    name: str
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        proc = self.engine.docker("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def state(self) -> dict[str, Any]:
        out = self.engine.docker("inspect", "--format", "{{json .State}}", self.name).stdout
        state: dict[str, Any] = json.loads(out)
        return state

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.engine.docker("exec", self.name, *argv, check=False)

    def wait_http(self, path: str, timeout: float = 30.0) -> None:
        """Wait until ``path`` answers 200; fail at once, with the logs, if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}{path}", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if not self.state().get("Running"):
                pytest.fail(f"{self.name} exited: {self.state()}\n{self.logs()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}{path} not 200 in {timeout} s\n{self.logs()[-4000:]}")
            time.sleep(0.1)


@dataclass
class Engine:
    """The docker CLI, and what this test started (removed at the end)."""

    prefix: str = field(default_factory=lambda: f"jennah-it-{uuid.uuid4().hex[:8]}")
    containers: list[Container] = field(default_factory=list)

    def docker(self, *args: str, timeout: float = 60.0,
               check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        proc = subprocess.run(["docker", *args], capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:4])} ...: {proc.stderr.strip()}")
        return proc

    def _args(self, name: str, env: Mapping[str, str], home: Path | None,
              mounts: Sequence[str]) -> list[str]:  # fmt: skip
        args = ["--name", f"{self.prefix}-{name}", "--label", f"{LABEL}={self.prefix}",
                "--network", "host", "--read-only"]  # fmt: skip
        if home is None:
            args += ["--tmpfs", f"{HOME}:uid={UID},gid={UID},mode=0700"]
        else:
            args += ["-v", f"{home}:{HOME}"]
        for mount in mounts:
            args += ["-v", mount]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        return args

    def start(self, name: str, image: str, env: Mapping[str, str], *, port: int = 0,
              home: Path | None = None, mounts: Sequence[str] = ()) -> Container:  # fmt: skip
        """``docker run -d`` of ``image``, read-only, only JENNAH_HOME writable."""
        self.docker("run", "-d", *self._args(name, env, home, mounts), image)
        container = Container(self, f"{self.prefix}-{name}", port)
        self.containers.append(container)
        return container

    def run_once(self, name: str, image: str, env: Mapping[str, str], argv: Sequence[str] = (),
                 *, home: Path | None = None, timeout: float = 60.0,
                 ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``docker run --rm`` in the foreground: its exit code, stdout and stderr."""
        return self.docker("run", "--rm", *self._args(name, env, home, ()), image, *argv,
                           timeout=timeout, check=False)  # fmt: skip

    def close(self) -> None:
        for c in self.containers:
            print(f"--- {c.name} (last lines) ---\n{c.logs()[-2500:]}")
        ids = self.docker("ps", "-aq", "--filter", f"label={LABEL}={self.prefix}").stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False)


@pytest.fixture(scope="session")
def engine_ready() -> None:
    """A Docker engine answers and both images are there, or skip (fail under CI)."""
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        missing_dependency("Docker", f"no docker client: {exc}")
    if proc.returncode != 0:
        missing_dependency("Docker", f"no engine answers: {proc.stderr.strip()[:300]}")
    for image in IMAGES.values():
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                          timeout=30, check=False).returncode != 0:  # fmt: skip
            missing_dependency("Docker", f"no image {image}: run make images")


@pytest.fixture
def engine(engine_ready: None) -> Iterator[Engine]:
    """Requested after the store's fixture, so the containers go before their database."""
    e = Engine()
    try:
        yield e
    finally:
        e.close()


# --- HTTP, the way the README does it -----------------------------------------------------


def curl(*args: str) -> tuple[int, str]:
    """Run curl; return (HTTP status, body). Status 0: no answer."""
    proc = subprocess.run(["curl", "-sS", "--max-time", "15", "-w", "\n%{http_code}", *args],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def rpc(base: str, method: str, body: Mapping[str, Any], key: str) -> tuple[int, dict[str, Any]]:
    """A Connect JSON call with curl, exactly as README.md shows them."""
    status, text = curl("-X", "POST", f"{base}{SERVICE}/{method}",
                        "-H", "Content-Type: application/json",
                        "-H", f"Authorization: Bearer {key}", "-d", json.dumps(body))  # fmt: skip
    return status, (json.loads(text) if text.strip() else {})


def write_keys(path: Path, tenants: Sequence[str]) -> dict[str, str]:
    """A key file (gateway/keyfile.py format) with one API key per tenant; tenant -> key."""
    keys: dict[str, str] = {}
    entries = []
    for tenant in tenants:
        key_id = secrets.token_hex(6)
        key = f"jk_{key_id}_{secrets.token_urlsafe(32)}"
        keys[tenant] = key
        entries.append({"id": key_id, "tenant": tenant, "label": "image-test",
                        "hash": "sha256:" + hashlib.sha256(key.encode()).hexdigest(),
                        "created_at": "2026-12-01T00:00:00Z", "revoked_at": None})  # fmt: skip
    path.write_text(json.dumps({"version": 1, "identities": {}, "keys": entries}))
    path.chmod(0o444)  # as a mounted secret: readable by the image's user
    return keys


def shared_home(tmp_path: Path) -> Path:
    """A host directory the image's user owns, mounted as JENNAH_HOME by every worker."""
    home = tmp_path / "home"
    home.mkdir()
    if os.geteuid() == 0:
        os.chown(home, UID, UID)
    else:
        home.chmod(0o777)
    return home


# --- a stack: a gateway and workers on one store -----------------------------------------


@dataclass
class Stack:
    engine: Engine
    home: Path
    keys: dict[str, str]
    gateway: Container
    workers: dict[str, Container]

    def call(self, tenant: str, method: str, body: Mapping[str, Any],
             deadline: float = 30.0) -> dict[str, Any]:  # fmt: skip
        """A call through the gateway, retrying what the gateway itself may answer while a
        worker goes away (``unavailable``; a SubmitJob keeps its request_id)."""
        end = time.monotonic() + deadline
        while True:
            try:
                status, resp = call(self.gateway.url, method, body,
                                    {"Authorization": f"Bearer {self.keys[tenant]}"})  # fmt: skip
            except OSError:
                status, resp = 0, {}
            if status == 200:
                return resp
            if status not in (0, 502, 503, 504) or time.monotonic() > end:
                raise AssertionError(f"{method} for {tenant}: {status} {resp}")
            time.sleep(0.1)

    def jobs(self) -> dict[str, dict[str, Any]]:
        """Every job of every tenant, by id (ListJobs through the gateway)."""
        out: dict[str, dict[str, Any]] = {}
        for tenant in self.keys:
            for job in self.call(tenant, "ListJobs", {"page_size": 500}).get("jobs", []):
                out[job["jobId"]] = job
        return out

    def executions(self) -> Counter[str]:
        """How many times the local provider started each job (the jobs count themselves)."""
        log = self.home / "executions.log"
        return Counter(log.read_text().split()) if log.exists() else Counter()


def job_body(request_id: str, seconds: float) -> dict[str, Any]:
    script = f'echo "$JENNAH_JOB_ID" >> {HOME}/executions.log; sleep {seconds}; echo done'
    return {"image_uri": "busybox", "commands": ["sh", "-c", script], "request_id": request_id}


def start_stack(engine: Engine, tmp_path: Path, store_env: Mapping[str, str],
                tenants: Sequence[str], n_workers: int = 2) -> Stack:  # fmt: skip
    home = shared_home(tmp_path)
    keys_file = tmp_path / "keys.json"
    keys = write_keys(keys_file, tenants)
    # The schema first, as docs/deploy.md says: `jennah db migrate` run with the worker image.
    migrate = engine.run_once("migrate", WORKER_IMAGE, store_env, ["jennah", "db", "migrate"],
                              home=home)  # fmt: skip
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    workers: dict[str, Container] = {}
    for i in range(1, n_workers + 1):
        wid, port = f"w{i}", free_port()
        env = {**store_env, "HOST": "127.0.0.1", "PORT": str(port), "WORKER_ID": wid,
               "JENNAH_WORKER_TOKEN": TOKEN, "BATCH_PROVIDER": "local",
               "WAL_DIR": f"{HOME}/{wid}/wal", "ARCHIVE_DIR": f"{HOME}/{wid}/archive",
               "WORKER_LEASE_TTL_SECONDS": str(LEASE_TTL),
               "WORKER_CLAIM_INTERVAL_SECONDS": str(CLAIM_INTERVAL),
               "WORKER_POLL_INTERVAL_SECONDS": "0.5"}  # fmt: skip
        workers[wid] = engine.start(wid, WORKER_IMAGE, env, port=port, home=home)
    for w in workers.values():
        w.wait_http("/ready", timeout=60)
    port = free_port()
    gateway = engine.start("gateway", GATEWAY_IMAGE, {
        "HOST": "127.0.0.1", "PORT": str(port), "JENNAH_WORKER_TOKEN": TOKEN,
        "WORKER_ENDPOINTS": ",".join(w.url for w in workers.values()),
        "JENNAH_API_KEYS_FILE": KEYS_PATH, "GATEWAY_HEALTH_INTERVAL_SECONDS": "0.5",
    }, port=port, mounts=[f"{keys_file}:{KEYS_PATH}:ro"])  # fmt: skip
    gateway.wait_http("/ready", timeout=60)
    return Stack(engine, home, keys, gateway, workers)


@pytest.fixture(params=["postgres", "sqlite"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "sqlite":
        return {"DB_PROVIDER": "sqlite"}  # DB_PATH: $JENNAH_HOME/jennah.db, shared
    url = request.getfixturevalue("postgres_db_url")
    return {"DB_PROVIDER": "postgres", "DATABASE_URL": url}


@pytest.fixture
def postgres_env(postgres_db_url: str) -> dict[str, str]:
    return {"DB_PROVIDER": "postgres", "DATABASE_URL": postgres_db_url}


# --- the images ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", sorted(IMAGES))
def test_image_size_is_under_300_mb(engine_ready: None, role: str) -> None:
    out = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", IMAGES[role]],
                         capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
    size = int(out)
    report(f"image {IMAGES[role]}: {size / 1e6:.0f} MB")
    assert size < MAX_IMAGE_BYTES, f"{IMAGES[role]} is {size / 1e6:.0f} MB"


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_worker_and_gateway_start_as_non_root_on_port_read_only(
    engine: Engine, tmp_path: Path, server: str
) -> None:
    wport, gport = free_port(), free_port()
    started = time.monotonic()
    worker = engine.start("worker", WORKER_IMAGE, {
        "HOST": "127.0.0.1", "PORT": str(wport), "JENNAH_WORKER_TOKEN": TOKEN,
        "WORKER_ID": "solo", "JENNAH_SERVER": server,
    }, port=wport)  # fmt: skip
    keys_file = tmp_path / "keys.json"
    keys = write_keys(keys_file, ["acme"])
    gateway = engine.start("gateway", GATEWAY_IMAGE, {
        "HOST": "127.0.0.1", "PORT": str(gport), "JENNAH_WORKER_TOKEN": TOKEN,
        "WORKER_ENDPOINTS": worker.url, "JENNAH_API_KEYS_FILE": KEYS_PATH,
        "JENNAH_SERVER": server,
    }, port=gport, mounts=[f"{keys_file}:{KEYS_PATH}:ro"])  # fmt: skip
    for c in (worker, gateway):
        c.wait_http("/health", timeout=60)
    for c in (worker, gateway):
        c.wait_http("/ready", timeout=30)
    report(f"{server}: worker and gateway containers ready in {time.monotonic() - started:.1f} s")
    # curl, as README.md and the probes of docs/deploy.md do, on the PORT given.
    for c in (worker, gateway):
        status, body = curl(f"{c.url}/health")
        assert (status, body.strip()) == (200, "ok"), (c.name, status, body)
    status, body = curl(f"{worker.url}/ready")
    assert status == 200 and "store sqlite ok" in body, body
    assert curl(f"{gateway.url}/ready")[0] == 200
    status, tenant = rpc(gateway.url, "GetCurrentTenant", {}, keys["acme"])
    assert (status, tenant) == (200, {"tenantId": "acme", "authMethod": "api-key"})

    for c in (worker, gateway):
        inspect = json.loads(engine.docker("inspect", c.name).stdout)[0]
        assert inspect["HostConfig"]["ReadonlyRootfs"] is True
        assert inspect["Config"]["User"] == f"{UID}:{UID}"
        # Every process of the container runs as the image's user.
        uids = c.exec("sh", "-c", "grep -h '^Uid:' /proc/[0-9]*/status").stdout.split("\n")
        assert uids[0] and all(line.split()[1:] == [str(UID)] * 4 for line in uids if line), uids
        # Only JENNAH_HOME can be written.
        assert c.exec("touch", f"{HOME}/probe").returncode == 0
        for path in ("/opt/jennah/probe", "/tmp/probe", "/probe"):
            denied = c.exec("touch", path)
            assert denied.returncode != 0 and "Read-only file system" in denied.stderr, path
    assert "WAL /var/lib/jennah/wal/solo" in worker.logs()

    # The image's HEALTHCHECK (python + urllib, on PORT) passes in the read-only container.
    deadline = time.monotonic() + 40
    while (health := worker.state().get("Health", {}).get("Status")) != "healthy":
        assert health in ("starting", None) and time.monotonic() < deadline, worker.state()
        time.sleep(0.5)

    # docker stop: a clean exit, well within the 10 s; the token never logged.
    for c in (gateway, worker):
        engine.docker("stop", "-t", str(int(CLOUD_RUN_STOP_SECONDS)), c.name, timeout=30)
        assert c.state()["ExitCode"] == 0, (c.state(), c.logs()[-3000:])
        assert TOKEN not in c.logs()
    assert "released 0 leases" in worker.logs()


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
def test_every_log_line_is_one_json_entry(engine: Engine, server: str) -> None:
    """JENNAH_LOG_FORMAT=json: Cloud Logging reads each stdout/stderr line as one entry."""
    port = free_port()
    worker = engine.start("worker", WORKER_IMAGE, {
        "HOST": "127.0.0.1", "PORT": str(port), "JENNAH_WORKER_TOKEN": TOKEN,
        "WORKER_ID": "solo", "JENNAH_SERVER": server,
    }, port=port)  # fmt: skip
    worker.wait_http("/ready", timeout=60)
    engine.docker("stop", "-t", str(int(CLOUD_RUN_STOP_SECONDS)), worker.name, timeout=30)
    lines = [ln for ln in worker.logs().splitlines() if ln.strip()]
    assert any("released" in ln for ln in lines), lines
    for line in lines:
        assert line.startswith("{"), line
        entry = json.loads(line)
        assert entry["severity"] and entry["message"] and entry["worker_id"] == "solo", entry


@pytest.mark.parametrize("role", sorted(IMAGES))
def test_missing_settings_exit_at_once_naming_every_variable(engine: Engine, role: str) -> None:
    started = time.monotonic()
    # Cloud Run would set PORT; a bad value is named along with what is missing.
    proc = engine.run_once(f"bare-{role}", IMAGES[role], {"PORT": "eighty"}, timeout=30)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert elapsed < 10, elapsed
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jennah {role}: "), proc.stderr
    wanted = {"worker": ["PORT", "JENNAH_WORKER_TOKEN"],
              "gateway": ["PORT", "WORKER_ENDPOINTS", "JENNAH_WORKER_TOKEN",
                          "JENNAH_API_KEYS_FILE"]}[role]  # fmt: skip
    assert all(name in lines[0] for name in wanted), lines[0]
    assert proc.stdout == ""


# --- the README's curl flow on a gateway and two workers ---------------------------------


def test_readme_curl_flow_on_a_gateway_and_two_workers(
    tmp_path: Path, store_env: dict[str, str], engine: Engine
) -> None:
    stack = start_stack(engine, tmp_path, store_env, ["acme"])
    key, gw = stack.keys["acme"], stack.gateway.url

    status, sub = rpc(gw, "SubmitJob", {"image_uri": "busybox", "env_vars": {"A": "1"},
                                        "commands": ["sh", "-c", "echo $A hello"]}, key)
    assert status == 200, sub
    job_id = sub["jobId"]
    assert sub["workerId"] in stack.workers and sub["status"].startswith("JOB_STATUS_")

    deadline = time.monotonic() + 60
    while True:
        status, got = rpc(gw, "GetJob", {"job_id": job_id}, key)
        assert status == 200, got
        if got["job"]["status"] in TERMINAL or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    job = got["job"]
    assert job["status"] == "JOB_STATUS_COMPLETED", job
    assert job["envVarNames"] == ["A"] and "envVars" not in job
    assert job.get("exitCode", 0) == 0 and job["tenantId"] == "acme"

    status, listed = rpc(gw, "ListJobs", {"page_size": 10}, key)
    assert status == 200 and [j["jobId"] for j in listed["jobs"]] == [job_id], listed
    status, listed = rpc(gw, "ListJobs", {"status": "JOB_STATUS_FAILED"}, key)
    assert status == 200 and listed.get("jobs", []) == [], listed

    status, events = rpc(gw, "ListJobEvents", {"job_id": job_id, "after_seq": 0}, key)
    assert status == 200, events
    evs = events["events"]
    assert [int(e["seq"]) for e in evs] == list(range(1, len(evs) + 1))
    assert evs[0]["kind"] == "EVENT_KIND_SUBMITTED" and evs[-1]["kind"] == "EVENT_KIND_COMPLETED"
    output = [e["output"] for e in evs if e["kind"] == "EVENT_KIND_OUTPUT"]
    assert "".join(output) == "1 hello\n", evs

    # Idempotent submit: the same request_id gives the same job.
    body = {"image_uri": "busybox", "commands": ["true"], "request_id": "nightly-2026-11-23"}
    first, second = rpc(gw, "SubmitJob", body, key), rpc(gw, "SubmitJob", body, key)
    assert first[0] == second[0] == 200 and first[1]["jobId"] == second[1]["jobId"]

    # CancelJob stops a running job; cancelling it again is failed_precondition.
    status, sub = rpc(gw, "SubmitJob", {"image_uri": "busybox", "commands": ["sleep", "60"]}, key)
    assert status == 200, sub
    long_id = sub["jobId"]
    deadline = time.monotonic() + 30
    while rpc(gw, "GetJob", {"job_id": long_id}, key)[1]["job"]["status"] != "JOB_STATUS_RUNNING":
        assert time.monotonic() < deadline, "the long job never ran"
        time.sleep(0.2)
    status, cancelled = rpc(gw, "CancelJob", {"job_id": long_id}, key)
    assert status == 200, cancelled
    deadline = time.monotonic() + 30
    while (st := rpc(gw, "GetJob", {"job_id": long_id}, key)[1]["job"]["status"]) not in TERMINAL:
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    assert st == "JOB_STATUS_CANCELLED"
    status, again = rpc(gw, "CancelJob", {"job_id": long_id}, key)
    assert (status, again.get("code")) == (400, "failed_precondition"), again

    # DeleteJob, then the job is not_found; errors are Connect errors.
    assert rpc(gw, "DeleteJob", {"job_id": job_id}, key)[0] == 200
    status, gone = rpc(gw, "GetJob", {"job_id": job_id}, key)
    assert (status, gone.get("code")) == (404, "not_found"), gone
    status, bad = rpc(gw, "SubmitJob", {"image_uri": "not an image", "commands": ["true"]}, key)
    assert (status, bad.get("code")) == (400, "invalid_argument"), bad
    status, anon = rpc(gw, "GetCurrentTenant", {}, "jk_000000000000_" + "n" * 43)
    assert (status, anon.get("code")) == (401, "unauthenticated"), anon
    status, metrics = curl(f"{stack.workers[sub['workerId']].url}/metrics")
    assert status == 200 and "# TYPE" in metrics


# --- faults: SIGTERM (docker stop) and SIGKILL (docker kill) of a worker -----------------


TENANTS = [f"tenant-{i}" for i in range(8)]


def submit_all(stack: Stack, count: int, seconds: float) -> list[str]:
    """Submit ``count`` jobs over the tenants; return the acknowledged job ids."""
    ids = []
    for i in range(count):
        tenant = TENANTS[i % len(TENANTS)]
        resp = stack.call(tenant, "SubmitJob", job_body(f"it-{uuid.uuid4().hex}", seconds))
        ids.append(resp["jobId"])
    return ids


def owned_active(stack: Stack, worker: str) -> set[str]:
    return {j["jobId"] for j in stack.jobs().values()
            if j.get("ownerWorkerId") == worker and j["status"] not in TERMINAL}  # fmt: skip


def wait_handed_over(stack: Stack, orphans: set[str], survivor: str, sent: float,
                     timeout: float) -> tuple[float, float]:  # fmt: skip
    """Wait until every orphan is owned by ``survivor`` or terminal; return the seconds
    after ``sent`` to the first and to the last."""
    first = 0.0
    while True:
        jobs = stack.jobs()
        left = {j for j in orphans
                if jobs[j]["status"] not in TERMINAL and jobs[j].get("ownerWorkerId") != survivor}
        now = time.monotonic() - sent
        if len(left) < len(orphans) and not first:
            first = now
        if not left:
            return first or now, now
        assert now < timeout, f"{len(left)} of {len(orphans)} jobs not handed over in {now:.1f} s"
        time.sleep(0.05)


def wait_all_terminal(stack: Stack, ids: Sequence[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = stack.jobs()
        missing = [j for j in ids if j not in jobs]
        assert not missing, f"acknowledged jobs lost: {missing}"
        pending = [j for j in ids if jobs[j]["status"] not in TERMINAL]
        if not pending:
            return jobs
        assert time.monotonic() < deadline, [jobs[j] for j in pending[:3]]
        time.sleep(0.3)


def check_each_ran_once(stack: Stack, ids: Sequence[str], jobs: Mapping[str, Any]) -> Counter[str]:
    runs = stack.executions()
    assert set(runs) <= set(ids), "something else ran"
    assert max(runs.values(), default=0) <= 1, {k: v for k, v in runs.items() if v > 1}
    outcomes: Counter[str] = Counter()
    for job_id in ids:
        job = jobs[job_id]
        outcomes[job["status"]] += 1
        if job["status"] == "JOB_STATUS_COMPLETED":
            assert runs[job_id] == 1, job
        else:  # its runner died with the worker's container (see the module docstring)
            why = {k: job.get(k) for k in ("jobId", "status", "failureClass", "exitCode",
                                            "errorMessage", "ownerWorkerId")}
            assert job["status"] == "JOB_STATUS_FAILED", why
            assert job.get("failureClass") == "FAILURE_CLASS_INFRASTRUCTURE", why
    return outcomes


def wait_all_started(stack: Stack, ids: Sequence[str], timeout: float = 30.0) -> None:
    """Wait until every job has started (RUNNING) or ended: its runner is past the window
    that ``test_a_job_whose_runner_died_before_starting_is_not_stranded`` shows."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = stack.jobs()
        if all(jobs[j]["status"] == "JOB_STATUS_RUNNING" or jobs[j]["status"] in TERMINAL
               for j in ids):  # fmt: skip
            return
        assert time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.1)


def pick_victim(stack: Stack) -> tuple[str, str, set[str]]:
    """The worker owning the most active jobs, the other one, and those jobs."""
    victim = max(stack.workers, key=lambda w: len(owned_active(stack, w)))
    survivor = next(w for w in stack.workers if w != victim)
    orphans = owned_active(stack, victim)
    assert orphans, "the victim owns no active job: the test would prove nothing"
    return victim, survivor, orphans


def test_docker_stop_hands_the_leases_over_within_cloud_runs_10_s(
    tmp_path: Path, postgres_env: dict[str, str], engine: Engine
) -> None:
    stack = start_stack(engine, tmp_path, postgres_env, TENANTS)
    ids = submit_all(stack, 24, seconds=4)
    wait_all_started(stack, ids)
    victim_id, survivor, orphans = pick_victim(stack)
    victim = stack.workers[victim_id]
    stopped: dict[str, float] = {}

    def docker_stop() -> None:  # what Cloud Run does: SIGTERM, SIGKILL after 10 s
        engine.docker("stop", "-t", str(int(CLOUD_RUN_STOP_SECONDS)), victim.name, timeout=30)
        stopped["exit"] = time.monotonic() - sent

    sent = time.monotonic()
    stopper = threading.Thread(target=docker_stop)
    stopper.start()
    first, last = wait_handed_over(stack, orphans, survivor, sent, timeout=CLOUD_RUN_STOP_SECONDS)
    stopper.join(30)
    state = victim.state()
    report(f"docker stop: {len(orphans)} leases handed over, first after {first:.2f} s, all "
           f"after {last:.2f} s; the container exited after {stopped['exit']:.2f} s "
           f"(exit code {state['ExitCode']})")
    assert last < CLOUD_RUN_STOP_SECONDS
    assert stopped["exit"] < CLOUD_RUN_STOP_SECONDS and state["ExitCode"] == 0, state
    assert "released" in victim.logs()

    jobs = wait_all_terminal(stack, ids, timeout=90)
    outcomes = check_each_ran_once(stack, ids, jobs)
    report(f"docker stop: the {len(ids)} jobs ended {dict(outcomes)}")


def test_docker_kill_loses_no_acknowledged_job(
    tmp_path: Path, postgres_env: dict[str, str], engine: Engine
) -> None:
    stack = start_stack(engine, tmp_path, postgres_env, TENANTS)
    ids = submit_all(stack, 16, seconds=4)
    wait_all_started(stack, ids)
    victim_id, survivor, orphans = pick_victim(stack)
    victim = stack.workers[victim_id]

    sent = time.monotonic()
    engine.docker("kill", victim.name)  # SIGKILL: no drain, no release
    # Submissions go on while the leases expire: the gateway routes around the dead worker.
    ids += submit_all(stack, 8, seconds=0.5)
    first, last = wait_handed_over(stack, orphans, survivor, sent,
                                   timeout=LEASE_TTL + CLAIM_INTERVAL + 6)  # fmt: skip
    assert victim.state()["ExitCode"] == 137
    report(f"docker kill: {len(orphans)} leases taken over, first after {first:.2f} s, all "
           f"after {last:.2f} s (lease TTL {LEASE_TTL:.0f} s, claims every "
           f"{CLAIM_INTERVAL:.0f} s)")
    assert len(set(ids)) == len(ids) == 24, "a retried submit made a second job"
    jobs = wait_all_terminal(stack, ids, timeout=90)
    outcomes = check_each_ran_once(stack, ids, jobs)
    report(f"docker kill: the {len(ids)} jobs ended {dict(outcomes)}")


def _submit_short_job(stack: Stack, tenant: str) -> dict[str, Any]:
    return stack.call(tenant, "SubmitJob", job_body(f"it-{uuid.uuid4().hex}", 0.5))


def test_a_job_whose_runner_died_before_starting_is_not_stranded(
    tmp_path: Path, engine: Engine
) -> None:
    """docker kill right after the submits were acknowledged, before every runner started
    its job (the runner is a Python process of its own: it takes a moment). The race is
    real, so the scenario is tried up to three times until the kill catches a job not yet
    started; never catching one fails (the test would prove nothing). Each try is a fresh
    stack on SQLite in its own shared volume, so no job of an earlier try is left over."""
    for attempt in range(3):
        try_dir = tmp_path / f"try-{attempt}"
        try_dir.mkdir()
        stack = start_stack(engine, try_dir, {"DB_PROVIDER": "sqlite"}, TENANTS)
        submit = partial(_submit_short_job, stack)
        with ThreadPoolExecutor(len(TENANTS)) as pool:
            acks = list(pool.map(submit, TENANTS))
        victim = acks[-1]["workerId"]
        engine.docker("kill", stack.workers[victim].name)
        ids = [a["jobId"] for a in acks]
        time.sleep(0.5)  # a runner still writing its line would have written it by now
        ran = stack.executions()
        unstarted = [a["jobId"] for a in acks
                     if a["workerId"] == victim and a["jobId"] not in ran]
        if unstarted:
            break
        engine.close()  # every container of this try
    assert unstarted, "in 3 tries every runner had started its job before the kill"
    report(f"docker kill before the runners started: {len(unstarted)} jobs had not started")
    # A new owner would relaunch them after the local provider's launch grace (10 s).
    jobs = wait_all_terminal(stack, ids, timeout=45)
    check_each_ran_once(stack, ids, jobs)
