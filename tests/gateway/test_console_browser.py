"""The web console in a real browser: Debian's headless Chromium driven by Playwright.

Against a real stack (a gateway and two workers, dev mode, SQLite, the local provider,
``tests/test_e2e.py``), plus an in-process gateway in API-key mode in front of the same
workers for the sign-in cases. Each test has its own browser context (so its own
``sessionStorage``) and, where it matters, its own tenant.

Chromium is Debian's ``/usr/bin/chromium``; the tests install it with apt when it is
missing, and never download Playwright's own browsers. Without a browser (or Playwright)
they skip loudly, and fail under ``CI=true``.

Run as a script, this module retakes the README's screenshots::

    .venv/bin/python -m tests.gateway.test_console_browser docs/images
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from gateway.keyfile import editing, new_key, revoked
from tests.fixtures.deps import missing_dependency
from tests.gateway.test_gateway_app import Gateway, settings_for
from tests.helpers import call, wait_until
from tests.test_e2e import Stack, _start_stack

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Dialog, Locator, Page, ViewportSize

# Generous: the first test may install Chromium with apt; the waits inside are bounded.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
WAIT_MS = 15_000  # how long a page may take to show what a test expects
TERMINAL = {"JOB_STATUS_COMPLETED", "JOB_STATUS_FAILED", "JOB_STATUS_CANCELLED"}


# --- the browser ---------------------------------------------------------------------


def _install_chromium() -> str:
    """``/usr/bin/chromium``, installed with apt if missing; the reason it is not there."""
    if Path(CHROMIUM).exists():
        return ""
    if shutil.which("apt-get") is None:
        return "no /usr/bin/chromium and no apt-get to install it"
    for step in (["apt-get", "install", "-y", "-q", "chromium"],
                 ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            subprocess.run(step, capture_output=True, timeout=600, check=False,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"apt-get failed: {exc}"
        if Path(CHROMIUM).exists():
            return ""
    return "apt-get install chromium did not provide /usr/bin/chromium"


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium under Playwright; a fresh profile (Playwright makes one per
    launch, in a temporary directory it removes)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        missing_dependency("playwright", f"{exc} (pip install -e '.[dev]')")
    why = _install_chromium()
    if why:
        missing_dependency("chromium", why)
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("console")
    yield from _start_stack(tmp, {"DB_PROVIDER": "sqlite", "DB_PATH": str(tmp / "jennah.db")})


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


Opener = Callable[..., "Page"]


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Opener]:
    """``open_page(url, **context options)``: a page in a fresh context. Every uncaught
    error of the page's script fails the test."""
    contexts = []
    errors: list[str] = []

    def opener(url: str, **options: Any) -> Page:
        context = browser.new_context(viewport=VIEWPORT, **options)
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        return page

    yield opener
    for context in contexts:
        context.close()
    assert errors == [], errors


# --- talking to the stack ------------------------------------------------------------


def submit(gateway: str, tenant: str, body: dict[str, Any]) -> str:
    status, resp = call(gateway, "SubmitJob", {"image_uri": "busybox", **body},
                        {"X-Tenant-Id": tenant})
    assert status == 200, resp
    job_id: str = resp["jobId"]
    return job_id


def get_job(gateway: str, tenant: str, job_id: str) -> tuple[int, dict[str, Any]]:
    return call(gateway, "GetJob", {"job_id": job_id}, {"X-Tenant-Id": tenant})


def wait_job(gateway: str, tenant: str, job_id: str, statuses: set[str]) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job: dict[str, Any] = get_job(gateway, tenant, job_id)[1]["job"]
        return job if job["status"] in statuses else None

    found: dict[str, Any] = wait_until(reached, timeout=WAIT_MS / 1000)
    return found


def row(page: Page, job_id: str) -> Any:
    return page.locator(f'tr[data-job-id="{job_id}"]')


def status_of(page: Page, job_id: str) -> Any:
    return row(page, job_id).locator("[data-status]")


# --- the jobs list -------------------------------------------------------------------


def test_the_list_shows_status_changes_without_a_reload(
    stack: Stack, open_page: Opener, tenant: str
) -> None:
    from playwright.sync_api import expect

    job_id = submit(stack.gateway, tenant, {"name": "live-one",
                                            "commands": ["sh", "-c", "sleep 2"]})
    page = open_page(f"{stack.gateway}/ui/?tenant={tenant}")
    expect(row(page, job_id).locator("a.name")).to_have_text("live-one")
    expect(status_of(page, job_id)).to_have_attribute(
        "data-status", re.compile("pending|scheduled|running"))
    page.evaluate("window.keptAcrossUpdates = true")
    expect(status_of(page, job_id)).to_have_attribute("data-status", "completed")
    assert page.evaluate("window.keptAcrossUpdates") is True  # the page was never reloaded
    expect(page.locator("#identity")).to_have_text(f"{tenant} (dev-header)")


def test_the_status_filter_and_paging(stack: Stack, open_page: Opener, tenant: str) -> None:
    from playwright.sync_api import expect

    ids = [submit(stack.gateway, tenant, {"name": f"p{i:02d}", "commands": ["true"]})
           for i in range(26)]
    failed = submit(stack.gateway, tenant, {"name": "broken", "commands": ["sh", "-c", "exit 3"]})
    wait_job(stack.gateway, tenant, failed, TERMINAL)
    page = open_page(f"{stack.gateway}/ui/?tenant={tenant}")
    rows = page.locator("#jobs tbody tr")
    expect(rows).to_have_count(25)
    expect(rows.first).to_have_attribute("data-job-id", failed)  # newest first
    expect(page.locator("#newer")).to_be_disabled()

    page.locator("#older").click()
    expect(rows).to_have_count(2)
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.jobId)") == [ids[1], ids[0]]
    expect(page.locator("#older")).to_be_disabled()
    expect(page.locator("#page")).to_have_text("Page 2")
    page.locator("#newer").click()
    expect(rows).to_have_count(25)

    page.locator("#status-filter").select_option("failed")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-job-id", failed)
    assert "status=failed" in page.url  # a reload keeps the filter
    page.locator("#status-filter").select_option("cancelled")
    expect(rows).to_have_count(0)
    expect(page.locator("#empty")).to_have_text("No cancelled jobs.")


def test_the_label_and_name_filters(stack: Stack, open_page: Opener, tenant: str) -> None:
    from playwright.sync_api import expect

    ml = submit(stack.gateway, tenant, {"name": "nightly-ml", "labels": {"team": "ml"},
                                        "commands": ["true"]})
    prod = submit(stack.gateway, tenant, {"name": "adhoc-ml", "commands": ["true"],
                                          "labels": {"team": "ml", "env": "prod"}})
    submit(stack.gateway, tenant, {"name": "nightly-ops", "labels": {"team": "ops"},
                                   "commands": ["true"]})
    page = open_page(f"{stack.gateway}/ui/?tenant={tenant}")
    rows = page.locator("#jobs tbody tr")

    def shows(*ids: str) -> None:
        """Wait for the table to list exactly these jobs (a count alone could still be
        the previous filter's)."""
        page.wait_for_function(
            "ids => [...document.querySelectorAll('#jobs tbody tr')]"
            "  .map(r => r.dataset.jobId).join() === ids.join()", arg=list(ids))

    expect(rows).to_have_count(3)

    page.fill("#label-filter", "team=ml")
    page.press("#label-filter", "Enter")
    shows(prod, ml)
    page.fill("#label-filter", "team=ml, env=prod")
    page.press("#label-filter", "Enter")
    shows(prod)
    page.fill("#label-filter", "team=ml")
    page.fill("#name-filter", "nightly-")
    page.click("#apply-filters")
    shows(ml)
    assert "label=team%3Dml" in page.url and "prefix=nightly-" in page.url
    page.reload()  # the URL keeps the filters
    expect(page.locator("#label-filter")).to_have_value("team=ml")
    expect(page.locator("#name-filter")).to_have_value("nightly-")
    shows(ml)
    page.fill("#label-filter", "team=nobody")
    page.press("#label-filter", "Enter")
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#empty")).to_have_text("No jobs match the filters.")

    # A label without "=" (from the URL, then typed): a message, an empty table, and no
    # call at all, the list's periodic refresh included (the page's clock is moved past
    # it). A label the gateway refuses: its message, and no second call.
    calls: list[str] = []
    page.on("request", lambda r: calls.append(r.post_data or "")
            if r.url.endswith("/ListJobs") else None)

    def refused(message: str) -> None:
        expect(page.locator("#filter-error")).to_have_text(re.compile(message))
        expect(rows).to_have_count(0)
        called = len(calls)
        page.clock.run_for(5_000)
        page.wait_for_timeout(200)
        assert calls[called:] == []

    page.clock.install()
    page.goto(f"{stack.gateway}/ui/?tenant={tenant}&label=team")
    refused(r'"team" is not key=value')
    assert calls == []
    page.fill("#label-filter", "team=ops")
    page.press("#label-filter", "Enter")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("nightly-ops")
    expect(page.locator("#filter-error")).to_be_hidden()
    assert '"labels":{"team":"ops"}' in calls[-1]
    page.fill("#label-filter", "team=ops, env")
    page.press("#label-filter", "Enter")
    refused(r'"env" is not key=value')
    page.fill("#label-filter", "Team=ops")
    page.press("#label-filter", "Enter")
    refused(r"^The gateway refused the filter: labels filter key 'Team' is invalid")


# --- the job page --------------------------------------------------------------------


def test_the_job_page_shows_output_as_it_arrives(
    stack: Stack, open_page: Opener, tenant: str
) -> None:
    from playwright.sync_api import expect

    job_id = submit(stack.gateway, tenant, {
        "name": "talker", "labels": {"team": "ml"}, "env_vars": {"SECRET": "hunter2"},
        "commands": ["sh", "-c", "echo first-line; sleep 2.5; echo second-line >&2"],
    })
    page = open_page(f"{stack.gateway}/ui/jobs/{job_id}?tenant={tenant}")
    output = page.locator("#output")
    expect(output).to_contain_text("first-line")
    # (The first line may come with the events read just after a GetJob that still saw
    # the job scheduled; the next second's read shows it running.)
    expect(page.locator("#job-status [data-status]")).to_have_attribute("data-status", "running")
    # One look at the page (its script cannot run in between): the first line is shown
    # while the job still runs, so it came live.
    shown = page.evaluate("""() => [document.querySelector('#output').textContent,
        document.querySelector('#job-status [data-status]').dataset.status,
        document.querySelector('#live').textContent]""")
    assert shown == ["first-line\n", "running", "live"], shown
    expect(output).to_contain_text("second-line")
    expect(output.locator(".stderr")).to_have_text("second-line\n")
    expect(page.locator("#job-status [data-status]")).to_have_attribute("data-status", "completed")
    expect(page.locator("#live")).to_have_text("ended")

    kinds = page.locator("#timeline tr").evaluate_all("rs => rs.map(r => r.dataset.kind)")
    assert kinds[0] == "submitted" and kinds[-1] == "completed" and "running" in kinds
    fields = page.locator("#fields").inner_text()
    assert job_id in fields and "team=ml" in fields and "SECRET" in fields
    assert "hunter2" not in page.content()  # env values are write-only
    assert "sh -c 'echo first-line; sleep 2.5; echo second-line >&2'" in fields
    expect(page.locator('[data-count="succeeded"] strong')).to_have_text("1")
    expect(page.locator("#tasks-card")).to_be_hidden()  # one task: its counts say it all
    for name in ("Created", "Started", "Completed"):
        expect(page.locator("#timestamps")).to_contain_text(name)


def test_the_tasks_of_a_job_of_several(
    stack: Stack, open_page: Opener, tenant: str, tmp_path: Path
) -> None:
    """Five tasks; task 2 fails with exit 4, and task 4 waits for the test's go (a file:
    the local provider runs on this host), so the page sees the job run. The table
    follows live, filters by status, and a click on an index shows that task's output."""
    from playwright.sync_api import expect

    go = tmp_path / "go"
    script = ('echo "line of $JENNAH_TASK_INDEX"; [ "$JENNAH_TASK_INDEX" != 4 ] || '
              f'for _ in $(seq 300); do [ -e {go} ] && break; sleep 0.05; done; '
              '[ "$JENNAH_TASK_INDEX" != 2 ] || exit 4')
    job_id = submit(stack.gateway, tenant, {"name": "five", "task_count": 5,
                                            "commands": ["sh", "-c", script]})
    page = open_page(f"{stack.gateway}/ui/jobs/{job_id}?tenant={tenant}")
    reads: list[str] = []  # the page's calls about the job (not the unread count's)
    page.on("request", lambda r: reads.append(f"{r.url.rsplit('/', 1)[1]} {r.post_data}")
            if "Service/" in r.url and "Notifications" not in r.url else None)

    def task(index: int) -> Locator:
        return page.locator(f'#task-rows tr[data-task-index="{index}"]')

    expect(task(4).locator("[data-status]")).to_have_attribute("data-status", "running")
    expect(task(2).locator("[data-status]")).to_have_attribute("data-status", "failed")
    expect(page.locator("#live")).to_have_text("live")
    go.touch()
    expect(task(4).locator("[data-status]")).to_have_attribute("data-status", "succeeded")
    expect(page.locator("#live")).to_have_text("ended")
    rows = page.locator("#task-rows tr")
    expect(rows).to_have_count(5)
    statuses = rows.evaluate_all(
        "rs => rs.map(r => [r.dataset.taskIndex, r.querySelector('[data-status]').dataset.status,"
        " r.querySelector('.exit').textContent])")
    assert statuses == [["0", "succeeded", "0"], ["1", "succeeded", "0"], ["2", "failed", "4"],
                        ["3", "succeeded", "0"], ["4", "succeeded", "0"]], statuses
    expect(task(2).locator("td.error")).to_contain_text("code 4")
    expect(page.locator("#tasks-page")).to_have_text("5 tasks · page 1 of 1")
    # The page stops with the job: no more calls once it ended.
    assert any(r.startswith("ListTasks ") for r in reads)
    read = len(reads)
    page.wait_for_timeout(1_500)
    assert reads[read:] == []

    page.locator("#task-filter").select_option("failed")
    expect(rows).to_have_count(1)
    expect(task(2)).to_be_visible()
    assert reads[-1].startswith("ListTasks ") and '"status":"TASK_STATUS_FAILED"' in reads[-1]
    page.locator("#task-filter").select_option("cancelled")
    expect(page.locator("#tasks-empty")).to_have_text("No cancelled tasks.")
    page.locator("#task-filter").select_option("")
    expect(rows).to_have_count(5)

    output = page.locator("#output")
    for i in range(5):
        expect(output).to_contain_text(f"[task {i}] line of {i}")
    task(3).locator("button.task-link").click()
    expect(output).to_have_text("[task 3] line of 3\n", use_inner_text=True)
    expect(page.locator("#output-filter")).to_contain_text("Only the output of task 3")
    expect(task(3)).to_have_class("picked")
    page.locator("#output-all").click()
    expect(page.locator("#output-filter")).to_be_hidden()
    assert sorted(output.inner_text().splitlines()) == [f"[task {i}] line of {i}"
                                                        for i in range(5)]
    page.goto(f"{stack.gateway}/ui/?tenant={tenant}")  # the list's compact task counts
    expect(row(page, job_id).locator(".tasks-cell")).to_have_text("4/5 ✓1 failed")


def test_a_job_of_many_tasks_pages_its_tasks(
    stack: Stack, open_page: Opener, tenant: str
) -> None:
    from playwright.sync_api import expect

    job_id = submit(stack.gateway, tenant, {"task_count": 150, "commands": ["true"]})
    wait_job(stack.gateway, tenant, job_id, TERMINAL)
    page = open_page(f"{stack.gateway}/ui/jobs/{job_id}?tenant={tenant}")
    first = page.locator("#task-rows tr").first
    expect(page.locator("#task-rows tr")).to_have_count(100)
    expect(page.locator("#tasks-page")).to_have_text("150 tasks · page 1 of 2")
    expect(page.locator("#tasks-previous")).to_be_disabled()
    page.locator("#tasks-next").click()
    expect(page.locator("#task-rows tr")).to_have_count(50)
    expect(first).to_have_attribute("data-task-index", "100")
    expect(page.locator("#tasks-next")).to_be_disabled()
    page.locator("#tasks-previous").click()
    expect(first).to_have_attribute("data-task-index", "0")
    expect(page.locator("#task-rows tr")).to_have_count(100)


def test_another_tenant_sees_nothing_of_a_job(
    stack: Stack, open_page: Opener, tenant: str
) -> None:
    from playwright.sync_api import expect

    job_id = submit(stack.gateway, tenant, {"name": "private", "commands": ["true"]})
    page = open_page(f"{stack.gateway}/ui/jobs/{job_id}?tenant=someone-else")
    expect(page.locator("#not-found h1")).to_have_text("Job not found")
    assert "private" not in page.content() and "Traceback" not in page.content()
    page.goto(f"{stack.gateway}/ui/?tenant=someone-else")
    expect(page.locator("#identity")).to_have_text("someone-else (dev-header)")
    expect(page.locator("#page")).to_have_text("Page 1")  # the list has been read
    expect(row(page, job_id)).to_have_count(0)
    # The owner's own unknown id, and a path that is no page, look the same.
    page.goto(f"{stack.gateway}/ui/jobs/no-such-job?tenant={tenant}")
    expect(page.locator("#not-found h1")).to_have_text("Job not found")
    page.goto(f"{stack.gateway}/ui/elsewhere?tenant={tenant}")
    expect(page.locator("#not-found h1")).to_have_text("Page not found")


def test_cancel_and_delete_from_the_page(stack: Stack, open_page: Opener, tenant: str) -> None:
    from playwright.sync_api import expect

    job_id = submit(stack.gateway, tenant, {"name": "sleeper", "commands": ["sleep", "60"]})
    page = open_page(f"{stack.gateway}/ui/jobs/{job_id}?tenant={tenant}")
    status = page.locator("#job-status [data-status]")
    expect(status).to_have_attribute("data-status", "running")
    page.once("dialog", lambda dialog: dialog.dismiss())  # "no": nothing happens
    page.locator("#cancel").click()
    page.wait_for_timeout(300)
    assert get_job(stack.gateway, tenant, job_id)[1]["job"]["status"] == "JOB_STATUS_RUNNING"

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel").click()
    expect(status).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#cancel")).to_be_disabled()
    expect(page.locator("#live")).to_have_text("ended")
    assert get_job(stack.gateway, tenant, job_id)[1]["job"]["status"] == "JOB_STATUS_CANCELLED"

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#delete").click()
    page.wait_for_url(f"{stack.gateway}/ui/?tenant={tenant}")
    assert get_job(stack.gateway, tenant, job_id)[1]["code"] == "not_found"


def test_names_labels_commands_and_output_render_as_text(
    stack: Stack, open_page: Opener, tenant: str
) -> None:
    from playwright.sync_api import expect

    name = "<img src=x onerror=alert(1)>"
    shout = "<script>alert(2)</script>"
    job_id = submit(stack.gateway, tenant, {
        "name": name,
        "commands": ["sh", "-c", f"echo '{shout}'; echo '<b>err</b>' >&2; exit 4"],
    })
    page = open_page(f"{stack.gateway}/ui/?tenant={tenant}")
    dialogs: list[str] = []

    def record(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", record)
    expect(row(page, job_id).locator("a.name")).to_have_text(name)
    expect(status_of(page, job_id)).to_have_attribute("data-status", "failed")

    page.goto(f"{stack.gateway}/ui/jobs/{job_id}?tenant={tenant}")
    expect(page.locator("#job-title")).to_have_text(name)
    expect(page.locator("#output")).to_have_text(f"{shout}\n<b>err</b>\n")
    expect(page.locator("#fields")).to_contain_text(f"echo '\\''{shout}'\\''")
    expect(page.locator("#job-error")).to_contain_text("code 4")
    page.goto(f"{stack.gateway}/ui/notifications?tenant={tenant}")
    expect(page.locator(f'[data-notification-id] a.name:text-is("{name}")')).to_have_count(1)
    # Nothing of the data became an element, and nothing ran.
    for tag in ("img", "script", "b", "i"):
        assert page.locator(f"main {tag}").count() == 0, tag
    assert dialogs == []


# --- the submit form -----------------------------------------------------------------


def test_the_submit_form_makes_the_job_it_describes(
    stack: Stack, open_page: Opener, tenant: str
) -> None:
    from playwright.sync_api import expect

    page = open_page(f"{stack.gateway}/ui/submit?tenant={tenant}")
    page.fill("#f-name", "from-the-form")
    page.fill("#f-image", "busybox")
    page.fill("#f-commands", "sh\n-c\necho \"task $JENNAH_TASK_INDEX of $JENNAH_TASK_COUNT\"\n")
    page.fill("#f-env", "GREETING=hello world\nbad line")
    page.fill("#f-labels", "team=ml\nrun=42")
    page.fill("#f-task-count", "3")
    page.fill("#f-parallelism", "2")
    page.select_option("#f-profile", "medium")
    page.fill("#f-cpu", "500")
    page.fill("#f-memory", "256")
    page.fill("#f-timeout", "600")
    page.click("#submit-form button[type=submit]")
    expect(page.locator("#submit-error")).to_have_text("Environment, line 2: expected NAME=value")

    page.fill("#f-env", "GREETING=hello world")
    page.click("#submit-form button[type=submit]")
    page.wait_for_url(f"{stack.gateway}/ui/jobs/**")
    job_id = page.url.split("/ui/jobs/")[1].split("?")[0]
    expect(page.locator("#job-title")).to_have_text("from-the-form")
    expect(page.locator("#task-counts .total")).to_have_text("3 tasks")

    job = get_job(stack.gateway, tenant, job_id)[1]["job"]
    assert job["commands"] == ["sh", "-c", 'echo "task $JENNAH_TASK_INDEX of $JENNAH_TASK_COUNT"']
    assert job["envVarNames"] == ["GREETING"] and job["labels"] == {"team": "ml", "run": "42"}
    assert (job["taskCount"], job["parallelism"], job["resourceProfile"]) == (3, 2, "medium")
    assert job["resourceOverride"] == {"cpuMillis": 500, "memoryMib": 256,
                                       "maxRunDurationSeconds": "600"}
    assert job["requestId"].startswith("ui-")
    expect(page.locator("#output")).to_contain_text("task 2 of 3")


# --- notifications -------------------------------------------------------------------


def test_notifications_with_their_unread_count(
    stack: Stack, open_page: Opener, tenant: str
) -> None:
    from playwright.sync_api import expect

    done = [submit(stack.gateway, tenant, {"name": f"n{i}", "commands": ["true"]})
            for i in range(2)]
    for job_id in done:
        wait_job(stack.gateway, tenant, job_id, TERMINAL)
    page = open_page(f"{stack.gateway}/ui/notifications?tenant={tenant}")
    count = page.locator("#unread")
    expect(count).to_have_text("2")
    expect(page.locator("#notes-summary")).to_have_text("2 unread")
    items = page.locator("#notifications li.unread")
    expect(items).to_have_count(2)
    items.filter(has_text="n0").get_by_role("button", name="Mark read").click()
    expect(page.locator("#notes-summary")).to_have_text("1 unread")
    expect(count).to_have_text("1")
    expect(page.locator("#notifications li.read")).to_contain_text("n0")
    page.locator("#unread-only").check()
    expect(page.locator("#notifications li")).to_have_count(1)
    _, listed = call(stack.gateway, "ListNotifications", {}, {"X-Tenant-Id": tenant})
    assert listed["unreadCount"] == 1

    # A new terminal job raises the count on any page, without a reload, at the next
    # poll (the page's clock is moved past it rather than waited for).
    page.clock.install()
    page.goto(f"{stack.gateway}/ui/?tenant={tenant}")
    expect(count).to_have_text("1")
    wait_job(stack.gateway, tenant, submit(stack.gateway, tenant, {"commands": ["true"]}),
             TERMINAL)
    page.clock.fast_forward(5_000)
    expect(count).to_have_text("2")


# --- authentication ------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Path]]:
    """A gateway outside dev mode (API keys, and oauth2-proxy identities from 127.0.0.1)
    in front of the stack's workers."""
    keys = tmp_path_factory.mktemp("console-keys") / "keys.json"
    with editing(keys) as contents:
        contents.identities["alice@example.com"] = "acme"
    gw = Gateway(settings_for(list(stack.workers), dev_mode=False, api_keys_file=str(keys),
                              trusted_proxies=("127.0.0.1/32",)))
    yield gw, keys
    gw.stop()


def test_a_revoked_key_brings_the_sign_in_prompt_back(
    keyed: tuple[Gateway, Path], open_page: Opener
) -> None:
    from playwright.sync_api import expect

    gw, keys = keyed
    with editing(keys) as contents:
        entry, key = new_key("acme", "console")
        contents.keys.append(entry)
    # The gateway re-reads the key file within a second.
    wait_until(lambda: call(gw.url, "GetCurrentTenant", {},
                            {"Authorization": f"Bearer {key}"})[0] == 200, timeout=5)
    page = open_page(f"{gw.url}/ui/")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#tenant")).to_have_count(0)  # no tenant field outside dev mode
    expect(page.locator("#nav")).to_be_hidden()

    page.fill("#api-key", key[:-4] + "xxxx")
    page.click("#signin button[type=submit]")
    expect(page.locator("#signin-message")).to_contain_text("invalid or revoked API key")
    page.fill("#api-key", key)
    page.click("#signin button[type=submit]")
    expect(page.locator("#identity")).to_have_text("acme (api-key)")
    expect(page.locator("#page")).to_have_text("Page 1")
    page.goto(f"{gw.url}/ui/submit")  # the key is kept for the tab: no second prompt
    expect(page.locator("#submit-form")).to_be_visible()
    page.goto(f"{gw.url}/ui/")
    expect(page.locator("#page")).to_have_text("Page 1")

    with editing(keys) as contents:
        contents.keys = [revoked(k) if k.id == entry.id else k for k in contents.keys]
    started = time.monotonic()
    expect(page.locator("#signin-message")).to_contain_text("revoked", timeout=10_000)
    assert time.monotonic() - started < 6
    expect(page.locator("#nav")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('jennah.apiKey')") is None


def test_behind_the_proxy_the_identity_needs_no_prompt(
    keyed: tuple[Gateway, Path], open_page: Opener
) -> None:
    """oauth2-proxy adds ``X-Auth-Request-Email`` to every request; here the browser
    context adds it, from 127.0.0.1, the trusted peer."""
    from playwright.sync_api import expect

    gw, _ = keyed
    page = open_page(f"{gw.url}/ui/",
                     extra_http_headers={"X-Auth-Request-Email": "alice@example.com"})
    expect(page.locator("#identity")).to_have_text("acme (proxy)")
    expect(page.locator("#signout")).to_be_hidden()  # nothing stored, nothing to forget
    expect(page.locator("#page")).to_have_text("Page 1")


def test_dev_mode_asks_for_a_tenant_when_none_is_given(stack: Stack, open_page: Opener) -> None:
    from playwright.sync_api import expect

    page = open_page(f"{stack.gateway}/ui/")
    expect(page.locator("#signin")).to_be_visible()
    page.fill("#tenant", "Not A Tenant")
    page.click("#signin button[type=submit]")
    expect(page.locator("#signin-message")).to_be_visible()
    page.fill("#tenant", "acme")
    page.click("#signin button[type=submit]")
    expect(page.locator("#identity")).to_have_text("acme (dev-header)")
    # Links carry the tenant, so one opened in a new tab (a new session) keeps it.
    expect(page.get_by_role("link", name="Submit", exact=True)).to_have_attribute(
        "href", "/ui/submit?tenant=acme")
    page.locator("#signout").click()
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


# --- the README's screenshots ----------------------------------------------------------


DEMO = "demo"


# A job of six tasks, three at a time: task 1 fails, 0 and 2 succeed, and 3 to 5 are still
# running (past their first lines of output) when the page is photographed.
TRAIN = """i=$JENNAH_TASK_INDEX
echo "shard $i: loading 2.1 GB from gs://corpus/part-000$i"
sleep 0.3
if [ "$i" = 1 ]; then echo "shard 1: checksum mismatch in part-0001" >&2; exit 3; fi
echo "shard $i: epoch 1/3 loss 0.4$i"
[ "$i" -lt 3 ] || sleep 30
echo "shard $i: done\""""


def take_screenshots(browser: Browser, gateway: str, out: Path) -> list[Path]:
    """Seed a few jobs for tenant ``demo``, photograph the jobs list and the page of a
    running job of several tasks into ``out`` (console-jobs.png, console-job.png), then
    cancel what still runs."""
    from playwright.sync_api import expect

    def job(name: str, script: str, **extra: Any) -> str:
        return submit(gateway, DEMO, {"name": name, "commands": ["sh", "-c", script], **extra})

    finished = [
        job("nightly-report", "echo report $JENNAH_TASK_INDEX ready", task_count=3,
            labels={"team": "finance"}),
        job("etl-orders", "echo loading; echo 'orders.csv: no such file' >&2; exit 2"),
    ]
    backfill = job("backfill-2026-11", "sleep 30")
    train = job("train-model", TRAIN, task_count=6, parallelism=3, resource_profile="large",
                labels={"team": "ml", "run": "r42"})
    thumbnails = job("thumbnails", "for i in $(seq 4); do echo resized batch $i/40; "
                     "sleep 0.2; done; sleep 30", labels={"team": "media"},
                     env_vars={"BUCKET": "s3://photos"})
    wait_job(gateway, DEMO, backfill, {"JOB_STATUS_RUNNING"})
    call(gateway, "CancelJob", {"job_id": backfill}, {"X-Tenant-Id": DEMO})
    for job_id in finished:
        wait_job(gateway, DEMO, job_id, TERMINAL)
    wait_job(gateway, DEMO, thumbnails, {"JOB_STATUS_RUNNING"})
    wait_until(lambda: get_job(gateway, DEMO, train)[1]["job"].get("taskCounts") ==
               {"succeeded": 2, "failed": 1, "running": 3}, timeout=WAIT_MS / 1000)
    context = browser.new_context(viewport={"width": VIEWPORT["width"], "height": 520})
    try:
        page = context.new_page()
        page.goto(f"{gateway}/ui/?tenant={DEMO}")
        expect(page.locator("#jobs tbody tr")).to_have_count(5)
        expect(row(page, train).locator(".tasks-cell")).to_contain_text("3 running")
        paths = [out / "console-jobs.png", out / "console-job.png"]
        page.screenshot(path=paths[0], full_page=True)
        page.goto(f"{gateway}/ui/jobs/{train}?tenant={DEMO}")
        expect(page.locator("#task-rows tr")).to_have_count(6)
        for i in range(3, 6):
            expect(page.locator("#output")).to_contain_text(f"shard {i}: epoch")
        page.screenshot(path=paths[1], full_page=True)
    finally:
        context.close()
        for job_id in (train, thumbnails):
            call(gateway, "CancelJob", {"job_id": job_id}, {"X-Tenant-Id": DEMO})
    return paths


def test_the_readme_screenshots_can_be_retaken(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    paths = take_screenshots(browser, stack.gateway, tmp_path)
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width = int.from_bytes(data[16:20], "big")
        assert width == VIEWPORT["width"] and len(data) > 20_000, (path, width, len(data))


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/images")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = {"DB_PROVIDER": "sqlite", "DB_PATH": str(Path(tmp) / "jennah.db")}
        with contextmanager(_start_stack)(Path(tmp), db) as running, chromium() as b:
            for path in take_screenshots(b, running.gateway, out):
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
