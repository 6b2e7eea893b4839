"""The batch provider port: one Protocol, implemented once per batch backend.

Every provider passes the same contract suite (``tests/providers/provider_contract.py``). The
contract:

* ``submit`` **must** be idempotent on ``task.provider_job_id``: a second submit with the
  same id adopts the existing job ("already exists" is success) and returns the same
  resource path. The worker derives that id deterministically from the Jennah job id and
  the attempt number (:func:`provider_job_id`), so a worker that dies between submitting
  and recording the result cannot make the job run twice.
* ``status`` takes many resource paths at once (up to ``capabilities.max_status_batch``
  per provider call; the provider splits larger batches itself) and **must** return an
  entry for every path asked. A job the provider does not know, or a state it cannot map,
  is reported with ``state=None`` (UNKNOWN): the worker never moves a job on that.
* ``cancel`` **must** be idempotent: cancelling a finished or already-cancelled job is
  not an error.
* Vendor exceptions never leave the adapter: they become ``ProviderError`` subclasses
  with ``retryable`` set.
* **Tasks** (docs/design.md §16): a job of ``spec.task_count`` > 1 tasks is one provider
  job (a GCP task group, an AWS array, an Azure job of N tasks, N local processes) whose
  tasks each see ``JENNAH_TASK_INDEX`` and ``JENNAH_TASK_COUNT`` (a plain job sees 0
  and 1), at most ``spec.parallelism`` running at a time (0: no limit). Its status
  carries ``tasks`` (sparse, see ``jennah.tasks``) and the job state they add up to
  (:func:`providers.tasks.status_from_tasks`). A task is retried by the provider itself,
  for the retryable failure classes, up to ``spec.max_retries`` (``TaskState.attempt``
  counts them); ``cancel`` stops every task; ``read_output`` reads one task's output.
* Calls are blocking; the worker runs them in a thread.
* What the cloud would refuse, or could not honour, is declared in ``capabilities``
  (label limits, reserved keys, machine type, spot, accelerators) and checked by
  :func:`check_spec` at SubmitJob, before anything is stored, so the job is refused as
  ``invalid_argument`` instead of being accepted and failing later, or having a setting
  silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from jennah.errors import InvalidArgument
from jennah.models import MAX_TASK_COUNT, FailureClass, JobSpec, JobStatus, TaskState


def provider_job_id(job_id: str, attempt: int) -> str:
    """The deterministic provider-side id of one execution of a job.

    Lowercase, starts with a letter and stays within 63 characters for a UUID job id,
    which satisfies GCP Batch's job-id rules (the strictest of our providers).
    """
    return f"j-{job_id.lower()}-{attempt}"


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do, declared as data."""

    max_status_batch: int = 100
    # The provider can return the job's stdout/stderr (``read_output``).
    supports_output: bool = False
    # Suggested seconds between status polls.
    poll_interval_seconds: float = 10.0
    # Calls block (the network, the disk): the worker runs them in a thread. A provider
    # that answers from memory (dry, fake) says False and is called on the event loop,
    # sparing each call a thread hand-off.
    blocking: bool = True
    # --- what SubmitJob may ask of it (check_spec) ---
    # Most user labels a job may carry (None: no limit of the provider's own); a provider
    # that adds labels or tags of its own counts them out of its cloud's limit here.
    max_labels: int | None = None
    # Label keys the cloud reserves for itself: by prefix, and whole keys.
    reserved_label_prefixes: tuple[str, ...] = ()
    reserved_label_keys: frozenset[str] = frozenset()
    # Whether a job's machine_type, use_spot_vms, boot_disk_size_gb, service_account and
    # accelerator (type, count) take effect.
    machine_type: bool = True
    spot: bool = True
    boot_disk: bool = True
    service_account: bool = True
    accelerator_type: bool = False
    accelerator_count: bool = False
    # Submits per second the cloud account takes, shared by all workers (None: no limit;
    # PROVIDER_SUBMIT_RATE overrides it). worker/admission.py spends it; each provider's
    # module says where its number comes from.
    submit_rate: float | None = None
    # A GPU count needs a type (GCP: the accelerator's type is what is asked for).
    accelerator_type_required: bool = False
    # --- jobs of several tasks (docs/design.md §16) ---
    # Most tasks in one job (1: the provider runs plain jobs only).
    max_task_count: int = MAX_TASK_COUNT
    # Whether ``spec.parallelism`` (at most that many tasks at a time) takes effect.
    parallelism: bool = True
    # Tasks one provider call can create (None: one call creates all of them). Submit
    # admission counts a job's provider calls with it (``submit_calls``).
    tasks_per_call: int | None = None
    # A job of more tasks than this needs ``commands``: the provider runs them through a
    # shell that gives each task its index, which an image's own CMD cannot be (None:
    # never needed).
    commands_required_over: int | None = None


@dataclass(frozen=True)
class ProviderTask:
    """One execution of a job, as handed to ``submit``."""

    provider_job_id: str
    job_id: str
    tenant_id: str
    attempt: int
    spec: JobSpec


@dataclass(frozen=True)
class ProviderStatus:
    """What the provider says about one job. ``state=None`` means UNKNOWN."""

    state: JobStatus | None
    raw_state: str = ""
    exit_code: int | None = None
    failure_class: FailureClass | None = None
    message: str = ""
    started_at: datetime | None = None
    completed_at: datetime | None = None
    # A job of several tasks: what is known of each (sparse, by index); None otherwise.
    tasks: tuple[TaskState, ...] | None = None


@dataclass(frozen=True)
class OutputChunk:
    """New stdout/stderr text since the given offsets (``read_output``)."""

    stdout: str = ""
    stderr: str = ""
    offsets: tuple[int, int] = (0, 0)


class BatchProvider(Protocol):
    """A batch backend that runs one container (or command) per job execution."""

    name: str
    capabilities: Capabilities

    def submit(self, task: ProviderTask) -> str:
        """Start the execution (idempotent on ``task.provider_job_id``); return its
        resource path, the provider's own name for it."""
        ...

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        """The status of each resource path; an entry for every path asked."""
        ...

    def cancel(self, resource_path: str) -> None:
        """Ask the provider to stop the execution, every task of it. Idempotent."""
        ...

    # Optional, when ``capabilities.supports_output``:
    # ``read_output(resource_path, offsets, task_index=0) -> OutputChunk``: what task
    # ``task_index`` printed after the (stdout, stderr) ``offsets``.

    def close(self) -> None:
        """Release clients and connections. Idempotent."""
        ...


def submit_calls(caps: Capabilities, task_count: int) -> int:
    """The provider calls that create a job of ``task_count`` tasks (admission)."""
    if caps.tasks_per_call is None or task_count <= 1:
        return 1
    return 1 + -(-task_count // caps.tasks_per_call)


def check_spec(name: str, caps: Capabilities, spec: JobSpec) -> None:
    """Raise ``InvalidArgument`` if provider ``name`` would refuse ``spec`` or could not
    honour all of it (docs/providers.md lists each provider's limits and their sources)."""
    if spec.task_count > caps.max_task_count:
        raise InvalidArgument(f"task_count: {spec.task_count} given; the {name} provider "
                              f"takes at most {caps.max_task_count}")
    if spec.parallelism and spec.parallelism < spec.task_count and not caps.parallelism:
        raise InvalidArgument(f"parallelism: the {name} provider cannot limit how many "
                              "tasks run at a time (leave it 0)")
    over = caps.commands_required_over
    if over is not None and spec.task_count > over and not spec.commands:
        raise InvalidArgument(
            f"commands: the {name} provider needs them for a job of more than {over} tasks "
            "(a shell runs them to give each task its JENNAH_TASK_INDEX; the image's own "
            "CMD cannot be run that way)")
    labels = spec.labels
    if caps.max_labels is not None and len(labels) > caps.max_labels:
        raise InvalidArgument(
            f"labels: {len(labels)} given; the {name} provider takes at most {caps.max_labels}")
    for key in labels:
        if key in caps.reserved_label_keys or key.startswith(caps.reserved_label_prefixes):
            raise InvalidArgument(f"labels: key {key!r} is reserved by the {name} provider")
    if spec.accelerator_count and not spec.accelerator_type and caps.accelerator_type_required:
        raise InvalidArgument(f"accelerator.type: the {name} provider needs it with "
                              "accelerator.count (for example nvidia-tesla-t4)")
    refused = [what for what, asked, honoured in (
        ("machine_type", spec.machine_type, caps.machine_type),
        ("use_spot_vms", spec.use_spot_vms, caps.spot),
        ("boot_disk_size_gb", spec.boot_disk_size_gb, caps.boot_disk),
        ("service_account", spec.service_account, caps.service_account),
        ("accelerator.type", spec.accelerator_type, caps.accelerator_type),
        ("accelerator.count", spec.accelerator_count, caps.accelerator_count),
    ) if asked and not honoured]
    if refused:
        raise InvalidArgument(
            f"{', '.join(refused)}: the {name} provider cannot honour "
            + ("it" if len(refused) == 1 else "them"))
