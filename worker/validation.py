"""Request validation (docs/design.md §8): every field is checked before anything is stored.

Each check raises ``InvalidArgument`` with a message naming the field, so a client can
fix its request without reading our code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from jennah.errors import InvalidArgument, echoed
from jennah.models import MAX_TASK_COUNT, RESOURCE_PROFILES, JobSpec, ResourceOverride

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# GCP label rules (the strictest of our providers).
LABEL_KEY_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
LABEL_VALUE_RE = re.compile(r"[a-z0-9_-]{0,63}")
MACHINE_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
ACCELERATOR_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
MAX_ACCELERATORS = 16

# The OCI distribution reference grammar: [domain[:port]/]path[:tag][@digest].
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_RE = re.compile(
    rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?"
)

MAX_ENV_VARS = 100
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_COMMAND_ARGS = 1000
MAX_ARG_BYTES = 128 * 1024
MAX_LABELS = 64
MAX_NAME_CHARS = 128
MAX_REQUEST_ID_CHARS = 128
MAX_RETRIES = 10
MAX_IMAGE_CHARS = 512


def _printable(value: str) -> bool:
    return value.isprintable()


def validate_image(image_uri: str) -> str:
    if not image_uri:
        raise InvalidArgument("image_uri is required")
    if len(image_uri) > MAX_IMAGE_CHARS or not IMAGE_RE.fullmatch(image_uri):
        raise InvalidArgument(
            f"image_uri {image_uri[:80]!r} is not a well-formed OCI image reference "
            "(expected [registry[:port]/]repository[:tag][@digest], lowercase repository)"
        )
    return image_uri


# What every task sees (docs/design.md §16); a job may not set them itself.
TASK_ENV_NAMES = frozenset({"JENNAH_TASK_INDEX", "JENNAH_TASK_COUNT"})


def validate_tasks(task_count: int, parallelism: int) -> tuple[int, int]:
    """``(task_count, parallelism)`` with 0 read as 1 task; ``InvalidArgument`` when the
    count is over MAX_TASK_COUNT or the parallelism over the count."""
    count = _bounded("task_count", task_count, MAX_TASK_COUNT) or 1
    if not 0 <= parallelism <= count:
        raise InvalidArgument(f"parallelism={parallelism} is out of range 0..{count} "
                              "(at most task_count)")
    return count, parallelism


def validate_env(env: Mapping[str, str]) -> dict[str, str]:
    if len(env) > MAX_ENV_VARS:
        raise InvalidArgument(f"env_vars has {len(env)} entries; at most {MAX_ENV_VARS}")
    for name, value in env.items():
        if not ENV_NAME_RE.fullmatch(name):
            raise InvalidArgument(
                f"env var name {name[:64]!r} is invalid: expected [A-Za-z_][A-Za-z0-9_]*"
            )
        if name in TASK_ENV_NAMES:
            raise InvalidArgument(f"env var {name} is set by Jennah for each task")
        if len(value.encode()) > MAX_ENV_VALUE_BYTES:
            # Never echo the value: it may be a secret.
            raise InvalidArgument(
                f"env var {echoed(name)} value is over {MAX_ENV_VALUE_BYTES} bytes")
        if "\x00" in value:
            raise InvalidArgument(f"env var {echoed(name)} value contains a NUL byte")
    return dict(env)


def validate_commands(commands: Sequence[str]) -> tuple[str, ...]:
    if len(commands) > MAX_COMMAND_ARGS:
        raise InvalidArgument(f"commands has {len(commands)} arguments; at most {MAX_COMMAND_ARGS}")
    for i, arg in enumerate(commands):
        if "\x00" in arg:
            raise InvalidArgument(f"commands[{i}] contains a NUL byte")
        if len(arg.encode()) > MAX_ARG_BYTES:
            raise InvalidArgument(f"commands[{i}] is over {MAX_ARG_BYTES} bytes")
    return tuple(commands)


def validate_labels(labels: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{field} has {len(labels)} entries; at most {MAX_LABELS}")
    for key, value in labels.items():
        if not LABEL_KEY_RE.fullmatch(key):
            raise InvalidArgument(
                f"{field} key {key[:70]!r} is invalid: expected [a-z][a-z0-9_-]{{0,62}}"
            )
        if not LABEL_VALUE_RE.fullmatch(value):
            raise InvalidArgument(
                f"{field}[{key}] value {value[:70]!r} is invalid: expected [a-z0-9_-]{{0,63}}"
            )
    return dict(labels)


def _bounded(field: str, value: int, maximum: int) -> int:
    if not 0 <= value <= maximum:
        raise InvalidArgument(f"{field}={value} is out of range 0..{maximum}")
    return value


def validate_spec(
    *,
    image_uri: str,
    commands: Sequence[str],
    env_vars: Mapping[str, str],
    name: str,
    labels: Mapping[str, str],
    resource_profile: str,
    override: ResourceOverride,
    machine_type: str,
    boot_disk_size_gb: int,
    use_spot_vms: bool,
    service_account: str,
    max_retries: int,
    accelerator_type: str = "",
    accelerator_count: int = 0,
    task_count: int = 1,
    parallelism: int = 0,
) -> JobSpec:
    """A validated ``JobSpec`` or ``InvalidArgument`` naming the first bad field."""
    tasks, parallel = validate_tasks(task_count, parallelism)
    if len(name) > MAX_NAME_CHARS or not _printable(name):
        raise InvalidArgument(f"name must be at most {MAX_NAME_CHARS} printable characters")
    profile = resource_profile or "small"
    if profile not in RESOURCE_PROFILES:
        raise InvalidArgument(
            f"resource_profile {profile[:32]!r} is unknown: expected one of "
            + ", ".join(RESOURCE_PROFILES)
        )
    if machine_type and not MACHINE_TYPE_RE.fullmatch(machine_type):
        raise InvalidArgument(f"machine_type {machine_type[:70]!r} is invalid")
    if len(service_account) > 256 or not _printable(service_account):
        raise InvalidArgument("service_account must be at most 256 printable characters")
    if accelerator_type and not ACCELERATOR_TYPE_RE.fullmatch(accelerator_type):
        raise InvalidArgument(f"accelerator.type {accelerator_type[:70]!r} is invalid")
    gpus = _bounded("accelerator.count", accelerator_count, MAX_ACCELERATORS)
    return JobSpec(
        image_uri=validate_image(image_uri),
        commands=validate_commands(commands),
        env_vars=validate_env(env_vars),
        name=name,
        labels=validate_labels(labels),
        resource_profile=profile,
        resource_override=ResourceOverride(
            cpu_millis=_bounded("resource_override.cpu_millis", override.cpu_millis, 1_000_000),
            memory_mib=_bounded("resource_override.memory_mib", override.memory_mib, 10_000_000),
            max_run_duration_seconds=_bounded(
                "resource_override.max_run_duration_seconds",
                override.max_run_duration_seconds,
                366 * 24 * 3600,
            ),
        ),
        machine_type=machine_type,
        boot_disk_size_gb=_bounded("boot_disk_size_gb", boot_disk_size_gb, 65_536),
        use_spot_vms=use_spot_vms,
        service_account=service_account,
        max_retries=_bounded("max_retries", max_retries, MAX_RETRIES),
        accelerator_type=accelerator_type,
        # A type alone asks for one.
        accelerator_count=gpus or (1 if accelerator_type else 0),
        task_count=tasks,
        parallelism=parallel,
    )


def validate_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS or not _printable(request_id):
        raise InvalidArgument(
            f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters"
        )
    return request_id
