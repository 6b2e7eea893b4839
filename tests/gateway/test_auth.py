"""Tenant authentication at the gateway, with real processes outside dev mode.

One ``jennah worker`` and one ``jennah gateway`` (``JENNAH_DEV_MODE=0``, a worker token,
an API key file managed with the ``jennah keys`` CLI, ``JENNAH_TRUSTED_PROXIES=127.0.0.2``)
on the dry provider. The trusted-proxy cases connect from source address 127.0.0.2 (a
trusted peer) or 127.0.0.1 (not trusted) to the same gateway.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from commands.gateway import main as gateway_main
from gateway.auth import TenantAuth, peer_ip
from gateway.keyfile import KeyFile as KeyFileContents
from gateway.keyfile import new_key, write_key_file
from gateway.keys import KeyStore
from jennah.errors import SettingsError, Unauthenticated
from jennah.v1 import deployment_pb2 as pb
from jennah.v1.deployment_connect import DeploymentServiceClientSync
from tests.helpers import REPO, SERVICE, call, free_port, start_jennah, stop, wait_http, wait_until

pytestmark = pytest.mark.timeout(120)

TOKEN = "worker-secret-" + secrets.token_hex(8)
TRUSTED_PROXY = "127.0.0.2"


def jennah_cli(*args: str, keys_file: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JENNAH_API_KEYS_FILE": str(keys_file)}
    return subprocess.run([sys.executable, "-m", "jennah", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=False)


def create_key(keys_file: Path, tenant: str, label: str = "") -> str:
    proc = jennah_cli("keys", "create", "--tenant", tenant, "--label", label, keys_file=keys_file)
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.strip()
    assert key.startswith("jk_") and "\n" not in key
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Stack:
    gateway: str
    gateway_port: int
    worker: str
    keys_file: Path
    acme: str  # API keys
    beta: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("auth")
    keys_file = tmp / "keys.json"
    acme, beta = create_key(keys_file, "acme", "ci"), create_key(keys_file, "beta")
    mapped = jennah_cli("keys", "map", "Alice@Example.com", "--tenant", "acme",
                        keys_file=keys_file)
    assert mapped.returncode == 0, mapped.stderr
    common = {
        "JENNAH_DEV_MODE": "0", "JENNAH_WORKER_TOKEN": TOKEN, "JENNAH_HOME": str(tmp),
        "BATCH_PROVIDER": "dry", "DB_PROVIDER": "sqlite", "DB_PATH": str(tmp / "jennah.db"),
        "WORKER_POLL_INTERVAL_SECONDS": "0.1", "WORKER_CLAIM_INTERVAL_SECONDS": "1",
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        wport, gport = free_port(), free_port()
        worker = f"http://127.0.0.1:{wport}"
        procs.append(start_jennah("worker", dict(common, WORKER_ID="w1", WORKER_PORT=str(wport)),
                                  tmp / "worker.log"))
        wait_http(f"{worker}/health", proc=procs[-1])
        procs.append(start_jennah("gateway", dict(
            common, GATEWAY_PORT=str(gport), WORKER_ENDPOINTS=worker,
            JENNAH_API_KEYS_FILE=str(keys_file), JENNAH_TRUSTED_PROXIES=f"{TRUSTED_PROXY}/32",
        ), tmp / "gateway.log"))
        gateway = f"http://127.0.0.1:{gport}"
        wait_http(f"{gateway}/health", proc=procs[-1])
        yield Stack(gateway, gport, worker, keys_file, acme, beta)
    finally:
        for proc in procs:
            stop(proc)


def code_of(resp: tuple[int, dict[str, Any]]) -> tuple[int, str]:
    return resp[0], resp[1].get("code", "ok")


def whoami(stack: Stack, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    return call(stack.gateway, "GetCurrentTenant", {}, headers)


def call_from(source: str, port: int, method: str, body: dict[str, Any],
              headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """A Connect JSON POST whose TCP connection comes from ``source`` (a loopback IP)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("POST", f"{SERVICE}/{method}", body=json.dumps(body),
                     headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def submit(stack: Stack, key: str) -> str:
    status, resp = call(stack.gateway, "SubmitJob",
                        {"image_uri": "busybox", "commands": ["true"]}, bearer(key))
    assert status == 200, resp
    job_id: str = resp["jobId"]
    return job_id


# --- real processes ------------------------------------------------------------------


def test_a_valid_key_identifies_its_tenant(stack: Stack) -> None:
    status, body = whoami(stack, bearer(stack.acme))
    assert (status, body) == (200, {"tenantId": "acme", "authMethod": "api-key"})
    assert whoami(stack, bearer(stack.beta))[1]["tenantId"] == "beta"
    job_id = submit(stack, stack.acme)
    status, got = call(stack.gateway, "GetJob", {"job_id": job_id}, bearer(stack.acme))
    assert status == 200 and got["job"]["tenantId"] == "acme"


@pytest.mark.parametrize("authorization", [
    "",                                              # no credentials at all
    "Bearer jk_0123456789ab_" + "A" * 43,            # well-formed, unknown id
    "Bearer garbage",
    "Basic YWxpY2U6c2VjcmV0",
])
def test_missing_unknown_and_malformed_keys_are_unauthenticated(
    stack: Stack, authorization: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    assert code_of(whoami(stack, headers)) == (401, "unauthenticated")
    assert code_of(call(stack.gateway, "ListJobs", {}, headers)) == (401, "unauthenticated")


def test_a_known_id_with_a_wrong_secret_is_refused(stack: Stack) -> None:
    forged = stack.acme[: len("jk_") + 12] + "_" + secrets.token_urlsafe(32)
    assert code_of(whoami(stack, bearer(forged))) == (401, "unauthenticated")


def test_tenant_and_worker_token_headers_from_clients_are_ignored(stack: Stack) -> None:
    forged = {"X-Tenant-Id": "acme", "X-Jennah-Worker-Token": TOKEN}
    assert code_of(whoami(stack, forged)) == (401, "unauthenticated")
    assert code_of(call(stack.gateway, "ListJobs", {}, forged)) == (401, "unauthenticated")
    # With beta's key the forged headers change nothing: beta is who the worker sees.
    acme_job = submit(stack, stack.acme)
    headers = {**bearer(stack.beta), **forged}
    assert whoami(stack, headers)[1]["tenantId"] == "beta"
    status, listed = call(stack.gateway, "ListJobs", {"page_size": 500}, headers)
    assert status == 200
    assert acme_job not in [j["jobId"] for j in listed.get("jobs", [])]
    assert all(j["tenantId"] == "beta" for j in listed.get("jobs", []))
    status, body = call(stack.gateway, "GetJob", {"job_id": acme_job}, headers)
    assert (status, body["code"]) == (404, "not_found")


def test_proxy_identity_only_from_a_trusted_peer(stack: Stack) -> None:
    alice = {"X-Auth-Request-Email": "alice@example.com"}
    status, body = call_from(TRUSTED_PROXY, stack.gateway_port, "GetCurrentTenant", {}, alice)
    assert (status, body) == (200, {"tenantId": "acme", "authMethod": "proxy"})
    # The same header from an untrusted peer (127.0.0.1) is refused.
    assert code_of(call_from("127.0.0.1", stack.gateway_port, "GetCurrentTenant", {}, alice)) \
        == (401, "unauthenticated")
    # An email with no mapping is refused, and is never used as a tenant id.
    stranger = {"X-Auth-Request-Email": "mallory@example.com"}
    assert code_of(call_from(TRUSTED_PROXY, stack.gateway_port, "ListJobs", {}, stranger)) \
        == (401, "unauthenticated")
    # The proxy cannot smuggle a tenant in X-Tenant-Id either.
    status, body = call_from(TRUSTED_PROXY, stack.gateway_port, "GetCurrentTenant", {},
                             {**alice, "X-Tenant-Id": "beta"})
    assert body.get("tenantId") == "acme"


def test_a_worker_called_directly_needs_the_token(stack: Stack) -> None:
    acme = {"X-Tenant-Id": "acme"}
    assert code_of(call(stack.worker, "ListJobs", {}, acme)) == (401, "unauthenticated")
    wrong = {**acme, "X-Jennah-Worker-Token": "not-the-token"}
    assert code_of(call(stack.worker, "ListJobs", {}, wrong)) == (401, "unauthenticated")
    assert code_of(call(stack.worker, "ListJobs", {}, bearer(stack.acme))) == \
        (401, "unauthenticated")  # an API key is for the gateway, not the workers
    right = {**acme, "X-Jennah-Worker-Token": TOKEN}
    assert call(stack.worker, "ListJobs", {}, right)[0] == 200


def test_a_tenant_cannot_touch_another_tenants_jobs(stack: Stack) -> None:
    job_id = submit(stack, stack.acme)
    acme, beta = bearer(stack.acme), bearer(stack.beta)
    wait_until(lambda: call(stack.gateway, "GetJob", {"job_id": job_id}, acme)[1]["job"]
               ["status"] == "JOB_STATUS_COMPLETED", timeout=15)
    for method in ("GetJob", "CancelJob", "DeleteJob", "ListJobEvents"):
        status, body = call(stack.gateway, method, {"job_id": job_id}, beta)
        assert (status, body.get("code")) == (404, "not_found"), method
    status, listed = call(stack.gateway, "ListJobs", {"page_size": 500}, beta)
    assert status == 200 and job_id not in [j["jobId"] for j in listed.get("jobs", [])]

    client = DeploymentServiceClientSync(stack.gateway, timeout_ms=10_000)
    try:
        with pytest.raises(ConnectError) as err:
            list(client.watch_job_events(pb.WatchJobEventsRequest(job_id=job_id), headers=beta))
        assert err.value.code == Code.NOT_FOUND
        # Tenant-wide watch: none of acme's events.
        events = list(client.watch_job_events(pb.WatchJobEventsRequest(), headers=beta))
        assert job_id not in {e.job_id for e in events}
        # The owner still sees everything: the refusals above changed nothing.
        own = list(client.watch_job_events(pb.WatchJobEventsRequest(job_id=job_id),
                                           headers=acme))
        assert own and {e.job_id for e in own} == {job_id}
    finally:
        client.close()
    status, got = call(stack.gateway, "GetJob", {"job_id": job_id}, acme)
    assert status == 200 and got["job"]["status"] == "JOB_STATUS_COMPLETED"


def test_keys_are_picked_up_and_revoked_without_restart(stack: Stack) -> None:
    key = create_key(stack.keys_file, "acme", "temporary")
    wait_until(lambda: whoami(stack, bearer(key))[0] == 200, timeout=5)
    key_id = key.split("_")[1]
    listed = jennah_cli("keys", "list", keys_file=stack.keys_file)
    assert key_id in listed.stdout and "temporary" in listed.stdout
    assert "sha256" not in listed.stdout and key not in listed.stdout

    revoked = jennah_cli("keys", "revoke", key_id, keys_file=stack.keys_file)
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    wait_until(lambda: whoami(stack, bearer(key))[0] == 401, timeout=5)
    assert time.monotonic() - started < 3
    assert code_of(whoami(stack, bearer(key))) == (401, "unauthenticated")
    assert whoami(stack, bearer(stack.acme))[0] == 200  # other keys unaffected
    after = jennah_cli("keys", "list", keys_file=stack.keys_file).stdout
    line = next(r for r in after.splitlines() if r.startswith(key_id))
    assert line.split()[-1] != "-"  # the revoked column is filled in
    assert stat.S_IMODE(stack.keys_file.stat().st_mode) == 0o600


def test_a_revoked_key_ends_its_streams(stack: Stack) -> None:
    """A tenant-wide ``follow`` watch opened with key K stops, with ``unauthenticated``,
    within about two seconds of ``jennah keys revoke K``, and sends nothing of a job that
    another key of the tenant submits afterwards (it used to keep streaming, output and
    all)."""
    key = create_key(stack.keys_file, "acme", "streaming")
    wait_until(lambda: whoami(stack, bearer(key))[0] == 200, timeout=5)
    seen: list[str] = []
    ended: list[BaseException | None] = []

    def watch() -> None:
        client = DeploymentServiceClientSync(stack.gateway, timeout_ms=30_000)
        try:
            for event in client.watch_job_events(pb.WatchJobEventsRequest(follow=True),
                                                 headers=bearer(key)):
                seen.append(event.job_id)
            ended.append(None)
        except BaseException as exc:  # recorded for the assertions below
            ended.append(exc)
        finally:
            client.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    status, before = call(stack.gateway, "SubmitJob", {"image_uri": "busybox"}, bearer(key))
    assert status == 200
    wait_until(lambda: before["jobId"] in seen, timeout=10)  # the stream works meanwhile

    revoked = jennah_cli("keys", "revoke", key.split("_")[1], keys_file=stack.keys_file)
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    watcher.join(timeout=6)
    assert not watcher.is_alive(), "the stream outlived its revoked key"
    assert time.monotonic() - started < 3.5
    assert isinstance(ended[0], ConnectError) and ended[0].code == Code.UNAUTHENTICATED
    status, after = call(stack.gateway, "SubmitJob", {"image_uri": "busybox"},
                         bearer(stack.acme))
    assert status == 200 and after["jobId"] not in seen


# --- start-up checks and the pieces, in process ----------------------------------------


def _gateway_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for name in ("PORT", "JENNAH_API_KEYS_FILE", "JENNAH_TRUSTED_PROXIES",
                 "GATEWAY_DISCOVER_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JENNAH_DEV_MODE", "0")
    monkeypatch.setenv("JENNAH_WORKER_TOKEN", "t")
    monkeypatch.setenv("WORKER_ENDPOINTS", "http://127.0.0.1:1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "JENNAH_API_KEYS_FILE (required unless JENNAH_DEV_MODE=1)"),
    ("{not json", "not valid JSON"),
    ('{"version": 1, "keys": [{"id": "x", "tenant": "acme", "hash": "h"}]}', "keys[0]: id"),
    ('{"version": 1, "identities": {"a@b.c": "Not_A_Tenant"}}', "tenant id"),
    ('{"version": 2}', "unsupported version"),
    ("missing-file", "No such file"),
])
def test_start_refused_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    content: str | None, fragment: str,
) -> None:
    env = {}
    if content is not None:
        path = tmp_path / "keys.json"
        if content != "missing-file":
            path.write_text(content)
        env["JENNAH_API_KEYS_FILE"] = str(path)
    _gateway_env(monkeypatch, **env)
    assert gateway_main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err


def test_bad_trusted_proxy_entry_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "keys.json"
    write_key_file(path, KeyFileContents())
    _gateway_env(monkeypatch, JENNAH_API_KEYS_FILE=str(path),
                 JENNAH_TRUSTED_PROXIES="10.0.0.0/8, not-an-ip")
    assert gateway_main() == 2
    assert "JENNAH_TRUSTED_PROXIES entry 'not-an-ip'" in capsys.readouterr().err


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_key_store_rechecks_at_most_once_per_interval_and_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    entry, plain = new_key("acme")
    write_key_file(path, KeyFileContents(keys=[entry]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    clock = FakeClock()
    store = KeyStore(path, clock=clock)
    store.load()
    assert store.tenant_for_key(plain) == "acme"
    write_key_file(path, KeyFileContents())  # the key is removed...
    assert store.tenant_for_key(plain) == "acme"  # ...but not looked at before 1 s
    clock.now += 1.0
    assert store.tenant_for_key(plain) is None
    reloads = store.reloads
    clock.now += 1.0
    store.refresh()
    assert store.reloads == reloads  # unchanged file: stat only, no re-read

    write_key_file(path, KeyFileContents(keys=[entry]))
    clock.now += 1.0
    assert store.tenant_for_key(plain) == "acme"
    path.write_text("{broken")
    clock.now += 1.0
    assert store.tenant_for_key(plain) is None  # fails closed
    assert store.error is not None and "not valid JSON" in store.error


def test_key_store_refuses_a_missing_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="JENNAH_API_KEYS_FILE"):
        KeyStore(tmp_path / "absent.json").load()


def test_tenant_auth_rules(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    entry, plain = new_key("acme")
    write_key_file(path, KeyFileContents(keys=[entry], identities={"bob@x.io": "beta"}))
    store = KeyStore(path)
    store.load()
    auth = TenantAuth(dev_mode=False, keys=store, trusted_proxies=["10.0.0.0/8", "::1"])
    assert auth.identify({"authorization": f"Bearer {plain}"}) == ("acme", "api-key")
    assert auth.identify({"authorization": f"bearer {plain}"}) == ("acme", "api-key")
    proxy = {"x-auth-request-email": "Bob@X.io"}
    assert auth.identify(proxy, "10.1.2.3:5555") == ("beta", "proxy")
    assert auth.identify(proxy, "::1:5555") == ("beta", "proxy")
    # oauth2-proxy may forward the user's ID token as a Bearer: the email still applies.
    assert auth.identify({**proxy, "authorization": "Bearer eyJhbGciOi"}, "10.0.0.1:1") == \
        ("beta", "proxy")
    for headers, peer in (
        (proxy, "11.0.0.1:80"), (proxy, None), ({"x-tenant-id": "acme"}, "10.0.0.1:1"),
        ({}, None), ({"authorization": "Bearer eyJhbGciOi"}, None),
    ):
        with pytest.raises(Unauthenticated):
            auth.identify(headers, peer)
    no_keys = TenantAuth(dev_mode=False)
    with pytest.raises(Unauthenticated, match="API keys are not configured"):
        no_keys.identify({"x-tenant-id": "acme"})
    dev = TenantAuth(dev_mode=True, keys=store)
    assert dev.identify({"x-tenant-id": "acme"}) == ("acme", "dev-header")
    assert dev.identify({"authorization": f"Bearer {plain}", "x-tenant-id": "zzz"}) == \
        ("acme", "api-key")
    assert peer_ip("[::ffff:10.0.0.1]:9") is not None
    assert str(peer_ip("::ffff:10.0.0.1:9")) == "10.0.0.1"
    assert peer_ip("garbage") is None
