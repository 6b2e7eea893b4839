"""Google Cloud Batch (``google-cloud-batch``): one Batch job per Jennah execution.

**Resource path**: the job's full name, ``projects/P/locations/R/jobs/<provider job id>``.

**Exactly once** (docs/design.md §4, §11): the Batch job id is the deterministic provider job id
(lowercase, starts with a letter, at most 63 characters), and ``request_id`` is a UUID5
of the Jennah job id and attempt, never the tenant's own ``request_id``. A create that
finds the job already there (ALREADY_EXISTS) adopts it.

**Status**: for a few paths, one ``get_job`` each (in a small thread pool). For many,
one paged ``list_jobs`` per active state (``status.state="RUNNING"`` …) covers every
active job of the region; only the paths not seen there (just finished, or unknown) are
fetched one by one. If the service refuses the filter, the provider falls back to
``get_job`` for good.

**Cancel**: ``cancel_job``, wait for its long-running operation, then read the job back:
``cancel`` returns only once GCP reports the job ended (CANCELLED, or it had already
finished); a cancel GCP failed, or one still in progress, raises ``ProviderUnavailable``,
so the worker keeps the job marked and cancels again next cycle. Until GCP confirms,
``CANCELLATION_IN_PROGRESS`` and ``DELETION_IN_PROGRESS`` are *not* terminal: they report
the state before them (RUNNING if the job started, else SCHEDULED) with a message, which
the poller records as a STATUS_DETAIL.

**Output**: ``read_output`` reads the job's task logs from Cloud Logging
(``providers/gcp_output.py``: offsets, ingestion delay, cost). So that a finished job's
last lines are read, ``status`` reports a job that ran and has ended as still RUNNING
(``raw_state`` the real one, with a message) until ``log_settle_seconds`` after its end.

**Limits** (``capabilities``, checked at SubmitJob; docs/providers.md gives the sources):
63 custom labels per job, of which this adapter uses 3 (``jennah-*``); keys starting with
``goog-`` or ``google-`` and Batch's predefined ``batch-*`` keys are reserved.
Accelerators need a type (``check``).

**Submit rate** (``Capabilities.submit_rate``, spent by ``worker/admission.py`` and shared
by the live workers): 100 a second. Batch allows 6,000 job changes a minute per project
and region, and a create is a change.

Vendor errors never leave this module: ``google.api_core`` exceptions become
``ProviderUnavailable`` (429, RESOURCE_EXHAUSTED, 5xx: retried here first, see
``providers/retry.py``) or ``ProviderRejected``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.api_core.future import polling
from google.cloud import batch_v1
from google.protobuf import duration_pb2

from jennah.errors import (
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    SettingsError,
)
from jennah.models import FailureClass, JobStatus
from jennah.settings import Env, ProviderSettings
from providers.base import Capabilities, OutputChunk, ProviderStatus, ProviderTask
from providers.gcp_output import (
    READ_SCOPE,
    HttpSession,
    OutputReader,
    ReadRation,
    RestLogReader,
    remember,
    to_nanos,
)
from providers.resources import JOB_ID_LABEL, job_environment, job_labels, resolve
from providers.retry import RetryPolicy

T = TypeVar("T")
log = logging.getLogger(__name__)
State = batch_v1.JobStatus.State

# docs/design.md §3: GCP job state → Jennah status (checked row by row by the tests).
GCP_STATES: Mapping[str, JobStatus] = {
    "QUEUED": JobStatus.SCHEDULED,
    "SCHEDULED": JobStatus.SCHEDULED,
    "RUNNING": JobStatus.RUNNING,
    "SUCCEEDED": JobStatus.COMPLETED,
    "FAILED": JobStatus.FAILED,
    "CANCELLED": JobStatus.CANCELLED,
}
# Not terminal until GCP confirms: the job keeps the state it had (RUNNING if it started,
# else SCHEDULED), with this message.
IN_PROGRESS_STATES: Mapping[str, str] = {
    "CANCELLATION_IN_PROGRESS": "cancellation in progress, not yet confirmed by GCP",
    "DELETION_IN_PROGRESS": "deletion in progress, not yet confirmed by GCP",
}
# Batch: at most 63 custom labels per job ("Organize resources using labels"); the
# adapter adds its own three (providers/resources.py job_labels).
GCP_MAX_JOB_LABELS = 63
ADAPTER_LABELS = frozenset({JOB_ID_LABEL, "jennah-tenant-id", "jennah-attempt"})
RESERVED_LABEL_PREFIXES = ("goog-", "google-")
# Batch's predefined labels (overriding one is an error), and the adapter's own keys
# (they would silently replace the tenant's).
RESERVED_LABEL_KEYS = frozenset({"batch-job-id", "batch-job-uid", "batch-node"}) | ADAPTER_LABELS
# Google's reserved exit codes (https://cloud.google.com/batch/docs/troubleshooting);
# any other 500xx is treated as infrastructure too.
GCP_EXIT_CODES: Mapping[int, FailureClass] = {
    50001: FailureClass.PREEMPTED,       # the Spot VM was preempted
    50002: FailureClass.INFRASTRUCTURE,  # the VM stopped reporting (timeout)
    50003: FailureClass.INFRASTRUCTURE,  # the VM rebooted during execution
    50004: FailureClass.INFRASTRUCTURE,  # the VM and task are unresponsive
    50005: FailureClass.TIMEOUT,         # the task exceeded max_run_duration
    50006: FailureClass.INFRASTRUCTURE,  # the VM was recreated during execution
}
# States listed in one call each when polling many jobs; a job absent from all of them is
# finished (or unknown) and is fetched on its own. Latest first, so that a job moving
# while we list is seen at most late, never early.
ACTIVE_STATES = ("RUNNING", "SCHEDULED", "QUEUED")
JOB_ID_RULE = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
JOB_NAME_RULE = re.compile(r"^projects/[^/]+/locations/[^/]+/jobs/[a-z][a-z0-9-]*$")
_EXIT_IN_TEXT = re.compile(r"exit code (-?\d+)")
_REQUEST_NS = uuid.UUID("6f1d5d3e-4c1b-5b0e-9a57-3d1c1e0a6a11")


def request_uuid(job_id: str, attempt: int) -> str:
    """The create ``request_id``: stable across retries and workers for one execution."""
    return str(uuid.uuid5(_REQUEST_NS, f"{job_id}/{attempt}"))


def failure_class(exit_code: int | None, detail: str) -> FailureClass:
    """Why a FAILED job failed (docs/design.md §3, §11)."""
    if exit_code is None or exit_code == 0:
        return FailureClass.QUOTA if "quota" in detail.lower() else FailureClass.INFRASTRUCTURE
    if exit_code in GCP_EXIT_CODES:
        return GCP_EXIT_CODES[exit_code]
    if 50000 <= exit_code <= 50999:
        return FailureClass.INFRASTRUCTURE
    return FailureClass.USER_ERROR


def translate(exc: Exception, what: str) -> ProviderError:
    """A ``google.api_core`` error as one of ours."""
    text = f"GCP Batch {what}: {type(exc).__name__}: {getattr(exc, 'message', exc)}"
    if isinstance(exc, gexc.TooManyRequests | gexc.RetryError | FutureTimeout):
        return ProviderUnavailable(text)  # 429 and RESOURCE_EXHAUSTED (a subclass)
    if isinstance(exc, gexc.ServerError) and not isinstance(exc, gexc.MethodNotImplemented):
        return ProviderUnavailable(text)
    return ProviderRejected(text)


@dataclass(frozen=True)
class Network:
    """Where the job's VMs attach (settings ``GCP_NETWORK``, ``GCP_SUBNETWORK``,
    ``GCP_NO_EXTERNAL_IP``); empty: the project's default network, with external IPs."""

    network: str = ""
    subnetwork: str = ""
    no_external_ip: bool = False

    def policy(self) -> batch_v1.AllocationPolicy.NetworkPolicy | None:
        if not (self.network or self.subnetwork or self.no_external_ip):
            return None
        nic = batch_v1.AllocationPolicy.NetworkInterface(
            network=self.network, subnetwork=self.subnetwork,
            no_external_ip_address=self.no_external_ip)
        return batch_v1.AllocationPolicy.NetworkPolicy(network_interfaces=[nic])


def build_job(task: ProviderTask, network: Network | None = None) -> batch_v1.Job:
    """The Batch job for one execution: every field Jennah promises (docs/providers.md)."""
    spec, res = task.spec, resolve(task.spec)
    container = batch_v1.Runnable.Container(image_uri=spec.image_uri,
                                            commands=list(spec.commands))
    task_spec = batch_v1.TaskSpec(
        runnables=[batch_v1.Runnable(container=container)],
        compute_resource=batch_v1.ComputeResource(cpu_milli=res.cpu_millis,
                                                  memory_mib=res.memory_mib),
        environment=batch_v1.Environment(variables=job_environment(task)),
        max_retry_count=0,  # Jennah retries, with a new execution id
    )
    if res.max_run_duration_seconds:
        task_spec.max_run_duration = duration_pb2.Duration(seconds=res.max_run_duration_seconds)
    model = batch_v1.AllocationPolicy.ProvisioningModel
    policy = batch_v1.AllocationPolicy.InstancePolicy(
        provisioning_model=model.SPOT if spec.use_spot_vms else model.STANDARD,
        machine_type=spec.machine_type,
    )
    if spec.boot_disk_size_gb:
        policy.boot_disk = batch_v1.AllocationPolicy.Disk(size_gb=spec.boot_disk_size_gb)
    if spec.accelerator_type:
        policy.accelerators = [batch_v1.AllocationPolicy.Accelerator(
            type_=spec.accelerator_type, count=spec.accelerator_count or 1)]
    allocation = batch_v1.AllocationPolicy(
        instances=[batch_v1.AllocationPolicy.InstancePolicyOrTemplate(
            policy=policy, install_gpu_drivers=bool(spec.accelerator_type))])
    nets = (network or Network()).policy()
    if nets is not None:
        allocation.network = nets
    if spec.service_account:
        allocation.service_account = batch_v1.ServiceAccount(email=spec.service_account)
    return batch_v1.Job(
        task_groups=[batch_v1.TaskGroup(task_spec=task_spec, task_count=1)],
        allocation_policy=allocation,
        labels=job_labels(task),
        logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
    )


def job_status(job: batch_v1.Job) -> ProviderStatus:
    """Map one Batch job (its state and status events) to a ``ProviderStatus``."""
    raw = State(job.status.state).name
    events = list(job.status.status_events)
    if raw in IN_PROGRESS_STATES:
        started = _first_event(events, ("RUNNING",))
        return ProviderStatus(state=JobStatus.RUNNING if started else JobStatus.SCHEDULED,
                              raw_state=raw, message=IN_PROGRESS_STATES[raw],
                              started_at=started)
    state = GCP_STATES.get(raw)
    exit_code: int | None = None
    for event in events:
        if "task_execution" in event:
            exit_code = event.task_execution.exit_code
        elif (m := _EXIT_IN_TEXT.search(event.description)) is not None:
            exit_code = int(m.group(1))
    if state is JobStatus.COMPLETED and exit_code is None:
        exit_code = 0
    started = _first_event(events, ("RUNNING",))
    completed = None
    if state is not None and state.terminal:
        completed = _first_event(events, ("SUCCEEDED", "FAILED", "CANCELLED"))
        if completed is None and "update_time" in job:
            completed = job.update_time
        if started is None and completed is not None and raw in ("SUCCEEDED", "FAILED"):
            run = job.status.run_duration
            started = completed - (run if isinstance(run, timedelta) else timedelta())
    message = events[-1].description if events else raw.lower()
    fc = failure_class(exit_code, message) if state is JobStatus.FAILED else None
    return ProviderStatus(state=state, raw_state=raw, exit_code=exit_code, failure_class=fc,
                          message=message, started_at=started, completed_at=completed)


def _first_event(events: Sequence[batch_v1.StatusEvent], states: Sequence[str]
                 ) -> datetime | None:
    for event in events:
        if any(f"to {s}" in event.description for s in states) and "event_time" in event:
            when: datetime = event.event_time
            return when
    return None


@dataclass(frozen=True)
class _Seen:
    """What ``read_output`` needs of a job, remembered from the last status read."""

    uid: str
    ended: datetime | None  # when it ended, if it ended after running


# Account-wide submits per second: Batch takes 6,000 job-changing requests a minute
# per project and region.
SUBMIT_RATE = 6000 / 60


@dataclass(frozen=True)
class GcpSettings:
    """``BATCH_PROVIDER=gcp``'s variables (docs/providers.md, GCP Batch)."""

    project_id: str
    region: str
    network: Network = Network()
    log_settle_seconds: float = 30.0
    log_reads_per_minute: float = 50.0

    @classmethod
    def from_env(cls, e: Env) -> GcpSettings:
        e.require(("BATCH_PROJECT_ID", "BATCH_REGION"), "BATCH_PROVIDER=gcp")
        network = Network(e.text("GCP_NETWORK"), e.text("GCP_SUBNETWORK"),
                          e.flag("GCP_NO_EXTERNAL_IP"))
        if network.no_external_ip and not (network.network or network.subnetwork):
            e.problems.append("GCP_NO_EXTERNAL_IP needs GCP_SUBNETWORK or GCP_NETWORK "
                              "(a subnetwork with Private Google Access or Cloud NAT)")
        return cls(
            project_id=e.text("BATCH_PROJECT_ID"), region=e.region(), network=network,
            log_settle_seconds=e.number("GCP_LOG_SETTLE_SECONDS", 30.0, float),
            log_reads_per_minute=e.number("GCP_LOG_READS_PER_MINUTE", 50.0, float, 1),
        )


class GcpBatchProvider:
    """Google Cloud Batch, through an injected ``BatchServiceClient`` (and, for output, a
    Cloud Logging reader)."""

    name = "gcp"
    settings_class = GcpSettings

    def __init__(
        self,
        client: batch_v1.BatchServiceClient,
        *,
        project: str,
        region: str,
        retry: RetryPolicy | None = None,
        list_threshold: int = 50,
        page_size: int = 500,
        status_concurrency: int = 8,
        call_timeout: float = 30.0,
        cancel_timeout: float = 60.0,
        lro_poll_seconds: float = 0.5,
        network: Network | None = None,
        logs: RestLogReader | None = None,
        log_settle_seconds: float = 30.0,
        log_reads_per_minute: float = 50.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.client = client
        self.parent = f"projects/{project}/locations/{region}"
        self.retry = retry or RetryPolicy()
        self.list_threshold = list_threshold
        self.page_size = page_size
        self.call_timeout = call_timeout
        self.cancel_timeout = cancel_timeout
        self.network = network or Network()
        self.log_settle = timedelta(seconds=log_settle_seconds)
        self.clock = clock
        self._output = OutputReader(logs) if logs is not None else None
        self._ration = ReadRation(log_reads_per_minute, clock=lambda: self.clock().timestamp(),
                                  sleep=sleep or time.sleep)
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self.capabilities = Capabilities(
            max_status_batch=10_000, poll_interval_seconds=10.0,
            submit_rate=SUBMIT_RATE,
            supports_output=logs is not None,
            max_labels=GCP_MAX_JOB_LABELS - len(ADAPTER_LABELS),
            reserved_label_prefixes=RESERVED_LABEL_PREFIXES,
            reserved_label_keys=RESERVED_LABEL_KEYS,
            machine_type=True, spot=True, accelerator_type=True, accelerator_count=True,
            accelerator_type_required=True)
        self._polling = gretry.Retry(predicate=polling.POLLING_PREDICATE, initial=lro_poll_seconds,
                                     maximum=max(lro_poll_seconds, 5.0), multiplier=1.5,
                                     timeout=cancel_timeout)
        self._list_works = True
        self._pool = ThreadPoolExecutor(max_workers=status_concurrency,
                                        thread_name_prefix="gcp-status")
        self._closed = threading.Event()

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> GcpBatchProvider:
        s = settings.read(GcpSettings.from_env)
        import google.auth
        import google.auth.exceptions
        from google.auth.transport.requests import AuthorizedSession

        try:
            client = batch_v1.BatchServiceClient()  # credentials: ADC
            credentials, _ = google.auth.default(scopes=[READ_SCOPE])  # type: ignore[no-untyped-call]
        except google.auth.exceptions.GoogleAuthError as exc:
            raise SettingsError(f"BATCH_PROVIDER=gcp: no Google credentials ({exc})") from exc
        session: HttpSession = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
        return cls(client, project=s.project_id, region=s.region, network=s.network,
                   logs=RestLogReader(session, project=s.project_id),
                   log_settle_seconds=s.log_settle_seconds,
                   log_reads_per_minute=s.log_reads_per_minute)

    @contextmanager
    def _vendor(self, what: str) -> Iterator[None]:
        try:
            yield
        except (gexc.GoogleAPIError, FutureTimeout) as exc:
            raise translate(exc, what) from exc

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def once() -> T:
            with self._vendor(what):
                return fn()
        return self.retry.call(f"gcp {what}", once)

    # --- submit -----------------------------------------------------------------------

    def submit(self, task: ProviderTask) -> str:
        if not JOB_ID_RULE.match(task.provider_job_id):
            raise ProviderRejected(f"{task.provider_job_id!r} is not a valid GCP Batch job id")
        if task.spec.accelerator_count and not task.spec.accelerator_type:
            # SubmitJob refuses it first (check_spec); this guards any other caller.
            raise ProviderRejected("accelerator.type: the gcp provider needs it with "
                                   "accelerator.count")
        request = batch_v1.CreateJobRequest(
            parent=self.parent, job_id=task.provider_job_id,
            job=build_job(task, self.network),
            request_id=request_uuid(task.job_id, task.attempt))
        name = f"{self.parent}/jobs/{task.provider_job_id}"

        def create() -> str:
            try:
                with self._vendor("create_job"):
                    created = self.client.create_job(request=request, retry=None,
                                                     timeout=self.call_timeout)
                    return str(created.name)
            except ProviderRejected as exc:
                if not isinstance(exc.__cause__, gexc.AlreadyExists):
                    raise
            with self._vendor("get_job"):  # adopt the job that is already there
                return str(self.client.get_job(name=name, retry=None,
                                               timeout=self.call_timeout).name)

        return self.retry.call("gcp submit", create)

    # --- status -----------------------------------------------------------------------

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        paths = list(dict.fromkeys(resource_paths))
        result: dict[str, ProviderStatus] = {}
        wanted = [p for p in paths if JOB_NAME_RULE.match(p)]
        for p in paths:
            if p not in wanted:
                result[p] = ProviderStatus(None, "UNKNOWN", message="not a GCP Batch job name")
        if len(wanted) >= self.list_threshold and self._list_works:
            result.update(self._listed(wanted))
        missing = [p for p in wanted if p not in result]
        result.update(self._get_each(missing))
        return result

    def _listed(self, paths: Sequence[str]) -> dict[str, ProviderStatus]:
        wanted, found = set(paths), {}
        try:
            for state in ACTIVE_STATES:
                request = batch_v1.ListJobsRequest(parent=self.parent, page_size=self.page_size,
                                                   filter=f'status.state="{state}"')
                for job in self._pages(request):
                    if job.name in wanted and job.name not in found:
                        found[job.name] = self._map(job)
        except ProviderRejected as exc:
            log.warning("GCP Batch refused the list filter, polling job by job: %s", exc)
            self._list_works = False
            return {}
        return found

    def _pages(self, request: batch_v1.ListJobsRequest) -> Iterator[batch_v1.Job]:
        while True:
            page = self._call("list_jobs", lambda: self.client.list_jobs(
                request=request, retry=None, timeout=self.call_timeout))
            yield from page.jobs
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def _get_each(self, paths: Sequence[str]) -> dict[str, ProviderStatus]:
        def one(path: str) -> ProviderStatus | ProviderError:
            try:
                job = self._call("get_job", lambda: self.client.get_job(
                    name=path, retry=None, timeout=self.call_timeout))
            except ProviderRejected as exc:
                if isinstance(exc.__cause__, gexc.NotFound):
                    return ProviderStatus(None, "UNKNOWN", message="no such job")
                return exc
            except ProviderError as exc:
                return exc
            return self._map(job)

        outcomes = dict(zip(paths, self._pool.map(one, paths), strict=True))
        errors = [o for o in outcomes.values() if isinstance(o, ProviderError)]
        if errors and len(errors) == len(outcomes):
            raise errors[0]
        return {p: o if isinstance(o, ProviderStatus)
                else ProviderStatus(None, "UNKNOWN", message=f"status unavailable: {o}")
                for p, o in outcomes.items()}

    def _map(self, job: batch_v1.Job) -> ProviderStatus:
        """``job_status``, remembering the job for ``read_output``, and holding back the end
        of a job that ran until its last output can have reached Cloud Logging."""
        st = job_status(job)
        ran_and_ended = st.state is not None and st.state.terminal and st.started_at is not None
        ended = st.completed_at if ran_and_ended else None
        remember(self._seen, str(job.name), _Seen(str(job.uid), ended))
        if ended is None or self._output is None or self.clock() >= ended + self.log_settle:
            return st
        return ProviderStatus(
            JobStatus.RUNNING, st.raw_state, started_at=st.started_at,
            message=f"{st.raw_state}; reading its last output from Cloud Logging for "
                    f"{self.log_settle.total_seconds():g}s before recording the end")

    # --- output -----------------------------------------------------------------------

    def read_output(self, resource_path: str, offsets: tuple[int, int]) -> OutputChunk:
        """The job's task-log lines after ``offsets`` (``providers/gcp_output.py``): one
        ``entries.list`` page per call (at most 1,000 entries and 1 MiB of text), fewer
        when Cloud Logging's read quota is rationed among the jobs."""
        reader = self._output
        if reader is None or not JOB_NAME_RULE.match(resource_path):
            return OutputChunk(offsets=offsets)
        seen = self._seen.get(resource_path) or self._look_up(resource_path)
        if seen is None:
            return OutputChunk(offsets=offsets)
        now = self.clock()
        settled = seen.ended is not None and now >= seen.ended + self.log_settle
        if settled:
            self._ration.wait(resource_path)  # the last reads: wait for quota
        elif not self._ration.turn(resource_path):
            return OutputChunk(offsets=offsets)  # not this job's turn: next cycle
        cutoff = None if settled else to_nanos(now - self.log_settle)
        try:
            page = self._call("entries.list", lambda: reader.read(
                seen.uid, offsets, cutoff, lambda: self._ration.wait(resource_path)))
        except ProviderUnavailable as exc:
            if settled:
                raise  # the end waits for this read: the poller tries again next cycle
            log.info("output of %s not read this cycle: %s", resource_path, exc)
            return OutputChunk(offsets=offsets)
        return OutputChunk(page.stdout, page.stderr, page.offsets)

    def _look_up(self, path: str) -> _Seen | None:
        try:
            self._map(self._call("get_job", lambda: self.client.get_job(
                name=path, retry=None, timeout=self.call_timeout)))
        except ProviderRejected as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                return None
            raise
        return self._seen.get(path)

    # --- cancel -----------------------------------------------------------------------

    def cancel(self, resource_path: str) -> None:
        if not JOB_NAME_RULE.match(resource_path):
            return

        def once() -> None:
            try:
                with self._vendor("cancel_job"):
                    op = self.client.cancel_job(name=resource_path, retry=None,
                                                timeout=self.call_timeout)
                    try:
                        op.result(timeout=self.cancel_timeout,  # type: ignore[no-untyped-call]
                                  polling=self._polling)
                    except gexc.GoogleAPICallError as exc:  # the operation itself failed
                        raise ProviderUnavailable(
                            f"GCP Batch failed to cancel {resource_path}: "
                            f"{type(exc).__name__}: {exc.message}") from exc
            except ProviderRejected as exc:
                # Unknown, finished or being cancelled already: the read below decides.
                if not isinstance(exc.__cause__, gexc.NotFound | gexc.FailedPrecondition):
                    raise

        self.retry.call("gcp cancel", once)
        self._confirm_ended(resource_path)

    def _confirm_ended(self, path: str) -> None:
        """Return only if GCP reports the job ended (or unknown); else raise
        ``ProviderUnavailable``, so that the worker asks again next cycle."""
        try:
            job = self._call("get_job", lambda: self.client.get_job(
                name=path, retry=None, timeout=self.call_timeout))
        except ProviderRejected as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                return
            raise
        self._map(job)
        raw = State(job.status.state).name
        if raw in ("CANCELLED", "SUCCEEDED", "FAILED"):
            return
        why = IN_PROGRESS_STATES.get(raw, "the cancel failed or was not applied")
        raise ProviderUnavailable(f"GCP Batch has not cancelled {path} yet: it is {raw} ({why})")

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._pool.shutdown(wait=True)
        self.client.transport.close()  # type: ignore[no-untyped-call]
