"""What a job asks of a cloud provider, worked out once for GCP, AWS and Azure.

* ``resolve``: the resource profile with the override applied, so that
  ``resource_profile=large`` means the same CPU and memory on every cloud, and a non-zero
  field of ``resource_override`` always wins over the profile.
* ``job_environment``: the tenant's variables plus ``JENNAH_*`` ones naming the execution
  (the same set the local provider gives its jobs).
* ``job_labels``: the tenant's labels plus ``jennah-*`` ones that find an execution from
  the cloud console, and that the AWS provider checks before adopting a job by name.
* ``task_index_script``, ``task_index_command``: a job's commands run by ``/bin/sh`` so
  that each task sees ``JENNAH_TASK_INDEX``, read from the cloud's own per-task variable
  (AWS arrays, and GCP jobs of more tasks than ``task_environments`` takes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jennah.errors import ProviderRejected
from jennah.models import RESOURCE_PROFILES, JobSpec
from providers.base import ProviderTask

DEFAULT_PROFILE = "small"
JOB_ID_LABEL = "jennah-job-id"
TASK_SHELL = "/bin/sh"  # a POSIX shell, which the image must have to be wrapped
TASK_SCRIPT_NAME = "jennah-task"  # $0 of the wrapper's script


@dataclass(frozen=True)
class Resources:
    cpu_millis: int
    memory_mib: int
    # 0 means "no limit of our own" (the provider's default applies).
    max_run_duration_seconds: int = 0

    @property
    def vcpus(self) -> str:
        """CPUs as a decimal string without trailing zeros (1500 → "1.5", 2000 → "2")."""
        return f"{self.cpu_millis / 1000:g}"


def resolve(spec: JobSpec) -> Resources:
    """The profile's CPU and memory, each replaced by the override when it is set."""
    name = spec.resource_profile or DEFAULT_PROFILE
    if name not in RESOURCE_PROFILES:
        known = ", ".join(RESOURCE_PROFILES)
        raise ProviderRejected(f"unknown resource profile {name!r} (expected one of {known})")
    cpu, memory = RESOURCE_PROFILES[name]
    override = spec.resource_override
    return Resources(
        cpu_millis=override.cpu_millis or cpu,
        memory_mib=override.memory_mib or memory,
        max_run_duration_seconds=max(0, override.max_run_duration_seconds),
    )


def job_environment(task: ProviderTask) -> dict[str, str]:
    """The container's variables; Jennah's own names win over the tenant's."""
    return {**task.spec.env_vars, "JENNAH_JOB_ID": task.job_id,
            "JENNAH_ATTEMPT": str(task.attempt), "JENNAH_TENANT_ID": task.tenant_id,
            "JENNAH_PROVIDER_JOB_ID": task.provider_job_id}


def job_labels(task: ProviderTask) -> dict[str, str]:
    """Labels (GCP), tags (AWS) or metadata (Azure); Jennah's own keys win."""
    return {**task.spec.labels, JOB_ID_LABEL: task.job_id.lower(),
            "jennah-tenant-id": task.tenant_id, "jennah-attempt": str(task.attempt)}


def task_index_script(variable: str) -> str:
    """The wrapper's script: export ``JENNAH_TASK_INDEX`` from the cloud's per-task
    ``variable`` (0 when it is unset or empty), then ``exec`` the arguments, so that the
    job's command replaces the shell: its arguments reach it unchanged (``"$@"``), and its
    exit code and signals are its own."""
    return f'export JENNAH_TASK_INDEX="${{{variable}:-0}}"; exec "$@"'


def task_index_command(script: str, commands: Sequence[str]) -> list[str]:
    """``commands`` as the wrapper runs them: ``/bin/sh -c SCRIPT jennah-task COMMANDS…``
    (``script``: ``task_index_script`` of the cloud's variable)."""
    return [TASK_SHELL, "-c", script, TASK_SCRIPT_NAME, *commands]
