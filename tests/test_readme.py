"""The README's examples, run as written against a real stack (a gateway and two workers,
SQLite, the local provider, dev mode): the curl calls of "Try it with curl", the
`buf curl` watches and the Python client example. Only the address (the README's
``localhost:8080``) and the ``<job id>`` / ``<nextPageToken>`` placeholders are replaced.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import call, wait_until
from tests.test_e2e import Stack, _start_stack

pytestmark = pytest.mark.e2e

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SECTION = README[README.index("## Try it with curl"):README.index("## Authentication")]
BIN = Path(sys.executable).parent


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.DOTALL)


@pytest.fixture(scope="module")
def readme_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("readme")
    yield from _start_stack(tmp, {"DB_PROVIDER": "sqlite", "DB_PATH": str(tmp / "jennah.db")})


def sh(script: str, stack: Stack) -> str:
    script = script.replace("localhost:8080", stack.gateway.removeprefix("http://"))
    script = script.replace("localhost:8081", stack.workers[0].removeprefix("http://"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                          text=True, timeout=60, env=env, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_curl_examples_work_as_written(readme_stack: Stack) -> None:
    first, calls = blocks(SECTION, "sh")[:2]
    out = json.loads(sh(first, readme_stack))  # SubmitJob
    job_id = out["jobId"]
    assert out["status"] in ("JOB_STATUS_SCHEDULED", "JOB_STATUS_PENDING")
    wait_until(lambda: call(readme_stack.gateway, "GetJob", {"job_id": job_id},
                            {"X-Tenant-Id": "acme"})[1]["job"]["status"]
               == "JOB_STATUS_COMPLETED", timeout=30)  # fmt: skip
    # The second block, line by line (the DeleteJob last: it removes the job).
    lines = [ln for ln in calls.splitlines() if ln.strip() and not ln.startswith("#")]
    setup = "\n".join(ln for ln in lines if not ln.startswith("curl"))
    outputs = {}
    curls = [ln for ln in lines if ln.startswith("curl")]
    for line in sorted(curls, key=lambda ln: "DeleteJob" in ln):
        code = line.split("#")[0].replace("<job id>", job_id).replace("<nextPageToken>", "")
        outputs[code] = sh(f"{setup}\n{code}", readme_stack).strip()
    by_method = {re.search(r"\$J/(\w+)", c).group(1) if "$J/" in c else c: o  # type: ignore[union-attr]
                 for c, o in outputs.items()}
    assert json.loads(by_method["GetJob"])["job"]["envVarNames"] == ["A"]
    events = json.loads(by_method["ListJobEvents"])["events"]
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    assert events[0]["kind"] == "EVENT_KIND_SUBMITTED"
    assert events[-1]["kind"] == "EVENT_KIND_COMPLETED"
    assert any(e.get("output") == "hello\n" for e in events)
    assert json.loads(by_method["GetCurrentTenant"]) == {"tenantId": "acme",
                                                          "authMethod": "dev-header"}
    health = [o for c, o in outputs.items() if "/health" in c]
    assert health == ["ok"]
    assert json.loads(by_method["DeleteJob"]) == {"jobId": job_id}


def test_the_buf_curl_watches_work_as_written(readme_stack: Stack) -> None:
    status, resp = call(readme_stack.gateway, "SubmitJob",
                        {"image_uri": "busybox", "commands": ["sh", "-c", "echo watched"]},
                        {"X-Tenant-Id": "acme"})  # fmt: skip
    assert status == 200, resp
    job_id = resp["jobId"]
    watch = next(b for b in blocks(SECTION, "sh") if "buf curl" in b)
    one, tenant = [c for c in re.split(r"\n(?=buf curl)", watch.strip()) if c]
    out = sh(one.replace("<job id>", job_id), readme_stack)
    events = [json.loads(x) for x in re.findall(r"^\{.*?^\}", out, re.DOTALL | re.MULTILINE)]
    assert events[-1]["kind"] == "EVENT_KIND_COMPLETED"  # it ended with the job
    assert "watched\n" in [e.get("output") for e in events]
    # The tenant-wide follow never ends by itself: read its first events, then stop it.
    proc = subprocess.Popen(["bash", "-c", tenant.replace(
        "localhost:8080", readme_stack.gateway.removeprefix("http://"))],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})  # fmt: skip
    try:
        assert proc.stdout is not None
        first = "".join(proc.stdout.readline() for _ in range(12))
        # The tenant's oldest event still stored (the curl test deleted its job).
        assert '"kind": "EVENT_KIND_SUBMITTED"' in first and '"position": "' in first
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # closes its stdout


def test_the_python_client_example_works_as_written(readme_stack: Stack) -> None:
    code = next(b for b in blocks(README, "python") if "JennahClient" in b)
    code = code.replace("http://127.0.0.1:8080", readme_stack.gateway)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("1 EVENT_KIND_SUBMITTED")
    assert "EVENT_KIND_OUTPUT hi" in "\n".join(lines)
    assert lines[-1].split()[1] == "EVENT_KIND_COMPLETED"
    assert [int(ln.split()[0]) for ln in lines] == list(range(1, len(lines) + 1))


CLI = README[README.index("## The `jennah` command"):README.index("## Configuration")]


def test_the_cli_examples_work_as_written(readme_stack: Stack, tmp_path: Path) -> None:
    """Each line of the CLI block runs as written (in a directory holding the README's
    ``job.yaml``), with ``<job id>`` replaced by a job of the right kind: the one the
    first submit made, or, for ``cancel``, one still running."""
    block, job_file = blocks(CLI, "sh")[0], blocks(CLI, "yaml")[0]
    (tmp_path / "job.yaml").write_text(job_file)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "JENNAH_URL": readme_stack.gateway}
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(". ")]

    def run(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", line], capture_output=True, text=True,
                              timeout=60, env=env, cwd=tmp_path)

    results: dict[str, subprocess.CompletedProcess[str]] = {}
    job_id = ""
    for line in lines:
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value
            continue
        if "<job id>" in line:
            target = job_id
            if line.startswith("jennah cancel"):
                sleeper = run("jennah submit busybox -- sleep 60")
                assert sleeper.returncode == 0, sleeper.stderr
                target = json.loads(sleeper.stdout)["jobId"]
            line = line.replace("<job id>", target)
        results[line] = proc = run(line)
        if not job_id and line.startswith("jennah submit"):
            job_id = json.loads(proc.stdout)["jobId"]
    by_start = {line.split(" --")[0].split(" -")[0]: r for line, r in results.items()}
    failed = {line: (r.returncode, r.stderr[-300:]) for line, r in results.items()
              if r.returncode != (3 if "exit 3" in line else 0)}
    assert not failed
    waited = next(r for line, r in results.items() if "exit 3" in line)
    assert "OUTPUT" in waited.stdout and "working" in waited.stdout
    assert "FAILED" in waited.stdout.splitlines()[-1]
    tasks = next(r for line, r in results.items() if "--tasks 4" in line)
    assert {f"task {i} of 4" for i in range(4)} <= set(
        ln.split(maxsplit=3)[-1] for ln in tasks.stdout.splitlines()), tasks.stdout
    assert "COMPLETED" in tasks.stdout.splitlines()[-1]
    listed_tasks = next(r for line, r in results.items() if line.startswith("jennah tasks"))
    assert listed_tasks.stdout.splitlines()[1].split()[:3] == ["0", "SUCCEEDED", "0"]
    notes = next(r for line, r in results.items() if line.startswith("jennah notifications"))
    assert notes.stdout.splitlines()[0].endswith("unread")
    from_file = next(r for line, r in results.items() if "job.yaml" in line)
    assert "from a file" in from_file.stdout and "COMPLETED" in from_file.stdout
    assert json.loads(by_start["jennah tenant"].stdout)["tenantId"] == "acme"
    listed = next(r for line, r in results.items() if line.startswith("jennah list --status"))
    assert {j["status"] for j in json.loads(listed.stdout).get("jobs", [])} == {
        "JOB_STATUS_FAILED"}
