"""Typed, frozen settings, read once from the environment at start-up (docs/design.md §7, §11).

Nothing below ``main`` reads ``os.environ``: settings objects are passed in through
constructors. Validation happens here, before any SDK import, network call or database
access, and a failure names **every** missing or invalid variable in one line.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from jennah.errors import SettingsError

T = TypeVar("T")

BATCH_PROVIDERS = ("local", "gcp", "aws", "azure", "dry", "fake")
DB_PROVIDERS = ("sqlite", "postgres", "dynamodb", "spanner", "memory")
SERVERS = ("uvicorn", "hypercorn", "pyvoy")

# Variables each backend cannot start without (checked before anything is imported).
REQUIRED_BY_PROVIDER: Mapping[str, tuple[str, ...]] = {
    "gcp": ("BATCH_PROJECT_ID", "BATCH_REGION"),
    "aws": ("AWS_JOB_QUEUE", "AWS_JOB_DEFINITION", "BATCH_REGION|AWS_REGION"),
    "azure": ("AZURE_BATCH_ENDPOINT", "AZURE_BATCH_POOL_ID"),
}
REQUIRED_BY_STORE: Mapping[str, tuple[str, ...]] = {
    "postgres": ("DATABASE_URL",),
    "spanner": ("DB_PROJECT_ID", "DB_INSTANCE", "DB_DATABASE"),
    "dynamodb": ("BATCH_REGION|AWS_REGION",),
}

_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}
_TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # the tenant id format (docs/design.md §8)


def _items(value: str) -> frozenset[str]:
    """``a, b,,c`` → ``{a, b, c}``."""
    return frozenset(filter(None, (v.strip() for v in value.split(","))))

# AWS Batch share identifiers and scheduling priorities (providers/aws.py).
_SHARE_ID = re.compile(r"[A-Za-z0-9]{1,255}")
_PRIORITY = re.compile(r"[0-9]{1,4}")


def jennah_home(env: Mapping[str, str]) -> Path:
    return Path(env.get("JENNAH_HOME") or Path(env.get("HOME") or "~").expanduser() / ".jennah")


class _Env:
    """Reads variables and collects every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def text(self, name: str, default: str = "") -> str:
        return self.env.get(name, "").strip() or default

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text(name, default).lower()
        if value not in choices:
            expected = ", ".join(choices)
            self.problems.append(f"{name}={value!r} (expected one of {expected})")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        raw = self.text(name).lower()
        if not raw:
            return default
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        self.problems.append(f"{name}={raw!r} (expected 1/0, true/false or yes/no)")
        return default

    def number(self, name: str, default: T, conv: Callable[[str], T], minimum: float = 0) -> T:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = conv(raw)
        except ValueError:
            self.problems.append(f"{name}={raw!r} (expected a number)")
            return default
        if value < minimum:  # type: ignore[operator]
            self.problems.append(f"{name}={raw!r} (must be at least {minimum})")
            return default
        return value

    def port(self, name: str, default: int) -> int:
        # Cloud Run sets PORT; it overrides the role's own port variable.
        raw_port = self.text("PORT") or self.text(name)
        if not raw_port:
            return default
        try:
            value = int(raw_port)
        except ValueError:
            value = -1
        if not 0 <= value <= 65535:
            self.problems.append(f"{'PORT' if self.text('PORT') else name}={raw_port!r}")
            return default
        return value

    def _per_tenant(self, name: str, expected: str, valid: Callable[[str], object],
                    default: bool) -> Iterator[tuple[str, str]]:
        """The ``tenant=value`` entries of ``name`` (``;``-separated; ``*=value`` too when
        ``default``); a malformed entry is a problem naming ``expected``."""
        for entry in filter(None, (e.strip() for e in self.text(name).split(";"))):
            tenant, sep, value = (part.strip() for part in entry.partition("="))
            known = _TENANT.fullmatch(tenant) or (default and tenant == "*")
            if sep and valid(value) and known:
                yield tenant, value
            else:
                self.problems.append(f"{name} entry {entry[:80]!r} (expected {expected})")

    def allow_lists(self, name: str) -> dict[str, frozenset[str]]:
        """``tenant=a,b;tenant2=c`` → ``{tenant: {a, b}, tenant2: {c}}``."""
        lists: dict[str, frozenset[str]] = {}
        for tenant, value in self._per_tenant(name, "tenant=a,b;tenant2=c", _items, False):
            lists[tenant] = lists.get(tenant, frozenset()) | _items(value)
        return lists

    def tenant_map(self, name: str, value: re.Pattern[str], expected: str) -> dict[str, str]:
        """``tenant=v;tenant2=w;*=default`` → ``{tenant: v, tenant2: w, "*": default}``."""
        return dict(self._per_tenant(name, f"tenant=<{expected}>;*=<{expected}>",
                                     value.fullmatch, True))

    def require(self, names: tuple[str, ...], owner: str) -> None:
        for name in names:
            alternatives = name.split("|")
            if not any(self.text(a) for a in alternatives):
                self.problems.append(f"{' or '.join(alternatives)} (required by {owner})")

    def check(self, role: str) -> None:
        if self.problems:
            detail = "; ".join(self.problems)
            raise SettingsError(f"invalid {role} settings: missing or invalid {detail}")


@dataclass(frozen=True)
class StoreSettings:
    kind: str = "sqlite"
    sqlite_path: Path = Path("jennah.db")
    database_url: str = ""
    # DATABASE_POOL_SIZE: the most PostgreSQL connections one process opens; it also sets
    # how much store work a worker queues before SubmitJob refuses (database/postgres.py).
    pool_size: int = 10
    spanner_project: str = ""
    spanner_instance: str = ""
    spanner_database: str = ""
    spanner_emulator_host: str = ""
    dynamodb_table_prefix: str = "jennah"
    aws_endpoint_url: str = ""
    region: str = ""


@dataclass(frozen=True)
class ProviderSettings:
    kind: str = "local"
    region: str = ""
    local_batch_dir: Path = Path("local")
    gcp_project_id: str = ""
    # GCP: where the jobs' VMs attach, and reading their output from Cloud Logging
    # (docs/providers.md, GCP Batch).
    gcp_network: str = ""
    gcp_subnetwork: str = ""
    gcp_no_external_ip: bool = False
    gcp_log_settle_seconds: float = 30.0
    gcp_log_reads_per_minute: float = 50.0
    aws_job_queue: str = ""
    aws_job_definition: str = ""
    aws_endpoint_url: str = ""
    # AWS_SPOT_JOB_QUEUE: the queue (SPOT compute environments) for jobs with use_spot_vms;
    # empty: such jobs are refused.
    aws_spot_job_queue: str = ""
    # AWS_SHARE_IDENTIFIER: fair-share identifier per tenant, ``tenant=share;*=default``
    # (used only on queues with a scheduling policy; providers/aws.py share_identifier).
    aws_share_identifiers: Mapping[str, str] = field(default_factory=dict)
    # AWS_SCHEDULING_PRIORITY: schedulingPriorityOverride per tenant, ``tenant=N;*=N``.
    aws_scheduling_priorities: Mapping[str, int] = field(default_factory=dict)
    # AWS_JOB_DEFINITION_CACHE_SECONDS: how long job definitions and queue facts are cached.
    aws_definition_cache_seconds: float = 300.0
    azure_batch_endpoint: str = ""
    azure_batch_pool_id: str = ""
    azure_batch_account_name: str = ""
    azure_batch_account_key: str = ""
    # A private registry for the Azure jobs' images (providers/azure.py Registry).
    azure_registry_server: str = ""
    azure_registry_username: str = ""
    azure_registry_password: str = field(default="", repr=False)
    azure_registry_identity: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AdmissionSettings:
    """SubmitJob admission limits (``worker/admission.py``); 0 disables a limit, and
    ``provider_submit_rate=None`` means the provider's published default."""

    tenant_submit_rate: float = 50.0
    tenant_submit_burst: int = 200
    tenant_max_active_jobs: int = 1000
    provider_submit_rate: float | None = None


@dataclass(frozen=True)
class WorkerSettings:
    worker_id: str
    host: str
    port: int
    advertise_url: str
    dev_mode: bool
    worker_token: str
    lease_ttl_seconds: float
    claim_interval_seconds: float
    poll_interval_seconds: float
    shutdown_grace_seconds: float
    server: str
    wal_dir: Path
    archive_dir: Path
    wal_retention_days: float
    read_max_bytes: int
    store: StoreSettings
    provider: ProviderSettings
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    # WAL_SEGMENT_BYTES: a segment of the worker's WAL is rolled at this size.
    wal_segment_bytes: int = 16 << 20
    # WAL_MAX_PENDING_BYTES: above this many undelivered bytes, appends are refused (the
    # producers keep their offsets and read again) instead of growing memory.
    wal_max_pending_bytes: int = 256 << 20
    # TENANT_SERVICE_ACCOUNTS: the service accounts each tenant may name in a job
    # (``tenant=a@p.iam.gserviceaccount.com,b@…;tenant2=…``). A job naming any other is
    # refused; empty means no tenant may name one.
    tenant_service_accounts: dict[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class GatewaySettings:
    host: str
    port: int
    dev_mode: bool
    worker_token: str
    worker_endpoints: tuple[str, ...]
    health_interval_seconds: float
    forward_timeout_seconds: float
    api_keys_file: str
    server: str
    read_max_bytes: int
    discover_from_store: bool
    shutdown_grace_seconds: float
    store: StoreSettings
    # JENNAH_TRUSTED_PROXIES: IPs/CIDRs whose X-Auth-Request-Email is believed (gateway/auth.py).
    trusted_proxies: tuple[str, ...] = ()


def _store_settings(e: _Env, home: Path) -> StoreSettings:
    kind = e.choice("DB_PROVIDER", DB_PROVIDERS, "sqlite")
    e.require(REQUIRED_BY_STORE.get(kind, ()), f"DB_PROVIDER={kind}")
    return StoreSettings(
        kind=kind,
        sqlite_path=Path(e.text("DB_PATH", str(home / "jennah.db"))).expanduser(),
        database_url=e.text("DATABASE_URL"),
        pool_size=e.number("DATABASE_POOL_SIZE", StoreSettings.pool_size, int, minimum=1),
        spanner_project=e.text("DB_PROJECT_ID"),
        spanner_instance=e.text("DB_INSTANCE"),
        spanner_database=e.text("DB_DATABASE"),
        spanner_emulator_host=e.text("SPANNER_EMULATOR_HOST"),
        dynamodb_table_prefix=e.text("DYNAMODB_TABLE_PREFIX", "jennah"),
        aws_endpoint_url=e.text("AWS_ENDPOINT_URL"),
        region=e.text("BATCH_REGION") or e.text("AWS_REGION"),
    )


def _provider_settings(e: _Env, home: Path) -> ProviderSettings:
    kind = e.choice("BATCH_PROVIDER", BATCH_PROVIDERS, "local")
    e.require(REQUIRED_BY_PROVIDER.get(kind, ()), f"BATCH_PROVIDER={kind}")
    return ProviderSettings(
        kind=kind,
        region=e.text("BATCH_REGION") or e.text("AWS_REGION"),
        local_batch_dir=Path(e.text("LOCAL_BATCH_DIR", str(home / "local"))).expanduser(),
        gcp_project_id=e.text("BATCH_PROJECT_ID"),
        gcp_network=e.text("GCP_NETWORK"),
        gcp_subnetwork=e.text("GCP_SUBNETWORK"),
        gcp_no_external_ip=e.flag("GCP_NO_EXTERNAL_IP"),
        gcp_log_settle_seconds=e.number("GCP_LOG_SETTLE_SECONDS", 30.0, float),
        gcp_log_reads_per_minute=e.number("GCP_LOG_READS_PER_MINUTE", 50.0, float, 1),
        aws_job_queue=e.text("AWS_JOB_QUEUE"),
        aws_job_definition=e.text("AWS_JOB_DEFINITION"),
        aws_endpoint_url=e.text("AWS_ENDPOINT_URL"),
        aws_spot_job_queue=e.text("AWS_SPOT_JOB_QUEUE"),
        aws_share_identifiers=e.tenant_map("AWS_SHARE_IDENTIFIER", _SHARE_ID, "letters/digits"),
        aws_scheduling_priorities={k: int(v) for k, v in e.tenant_map(
            "AWS_SCHEDULING_PRIORITY", _PRIORITY, "0-9999").items()},
        aws_definition_cache_seconds=e.number("AWS_JOB_DEFINITION_CACHE_SECONDS", 300.0, float),
        azure_batch_endpoint=e.text("AZURE_BATCH_ENDPOINT"),
        azure_batch_pool_id=e.text("AZURE_BATCH_POOL_ID"),
        azure_batch_account_name=e.text("AZURE_BATCH_ACCOUNT_NAME"),
        azure_batch_account_key=e.text("AZURE_BATCH_ACCOUNT_KEY"),
        azure_registry_server=e.text("AZURE_REGISTRY_SERVER"),
        azure_registry_username=e.text("AZURE_REGISTRY_USERNAME"),
        azure_registry_password=e.text("AZURE_REGISTRY_PASSWORD"),
        azure_registry_identity=e.text("AZURE_REGISTRY_IDENTITY_RESOURCE_ID"),
    )


def _admission_settings(e: _Env) -> AdmissionSettings:
    d = AdmissionSettings()
    provider_rate = e.number("PROVIDER_SUBMIT_RATE", -1.0, float, minimum=0)
    tenant_rate = e.number("TENANT_SUBMIT_RATE", d.tenant_submit_rate, float)
    for name, value in (("PROVIDER_SUBMIT_RATE", provider_rate), ("TENANT_SUBMIT_RATE",
                                                                   tenant_rate)):
        if value != value or value == float("inf"):  # NaN or infinite
            e.problems.append(f"{name}={value!r} (expected a finite number; 0 disables)")
    return AdmissionSettings(
        tenant_submit_rate=tenant_rate,
        tenant_submit_burst=e.number("TENANT_SUBMIT_BURST", d.tenant_submit_burst, int, 1),
        tenant_max_active_jobs=e.number("TENANT_MAX_ACTIVE_JOBS", d.tenant_max_active_jobs, int),
        provider_submit_rate=None if provider_rate < 0 else provider_rate,
    )


def load_store_settings(env: Mapping[str, str] | None = None) -> StoreSettings:
    """Only the job store settings (for ``jennah db migrate`` and the WAL tools)."""
    e = _Env(os.environ if env is None else env)
    settings = _store_settings(e, jennah_home(e.env))
    e.check("store")
    return settings


def load_worker_settings(env: Mapping[str, str] | None = None) -> WorkerSettings:
    """Worker settings from ``env`` (default: ``os.environ``); ``SettingsError`` if bad."""
    e = _Env(os.environ if env is None else env)
    home = jennah_home(e.env)
    host = e.text("HOST", "127.0.0.1")
    port = e.port("WORKER_PORT", 8081)
    ttl = e.number("WORKER_LEASE_TTL_SECONDS", 30.0, float, minimum=0.1)
    settings = WorkerSettings(
        worker_id=e.text("WORKER_ID") or socket.gethostname(),
        host=host,
        port=port,
        advertise_url=e.text("WORKER_ADVERTISE_URL", f"http://{host}:{port}"),
        dev_mode=e.flag("JENNAH_DEV_MODE"),
        worker_token=e.text("JENNAH_WORKER_TOKEN"),
        lease_ttl_seconds=ttl,
        claim_interval_seconds=e.number("WORKER_CLAIM_INTERVAL_SECONDS", 5.0, float, 0.05),
        poll_interval_seconds=e.number("WORKER_POLL_INTERVAL_SECONDS", 1.0, float, 0.05),
        shutdown_grace_seconds=e.number("SHUTDOWN_GRACE_SECONDS", 8.0, float),
        server=e.choice("JENNAH_SERVER", SERVERS, "uvicorn"),
        wal_dir=Path(e.text("WAL_DIR", str(home / "wal"))).expanduser(),
        archive_dir=Path(e.text("ARCHIVE_DIR", str(home / "archive"))).expanduser(),
        wal_retention_days=e.number("WAL_RETENTION_DAYS", 30.0, float),
        read_max_bytes=e.number("READ_MAX_BYTES", 1024 * 1024, int, 1024),
        store=_store_settings(e, home),
        provider=_provider_settings(e, home),
        admission=_admission_settings(e),
        wal_segment_bytes=e.number("WAL_SEGMENT_BYTES", 16 << 20, int, 4096),
        wal_max_pending_bytes=e.number("WAL_MAX_PENDING_BYTES", 256 << 20, int, 1 << 20),
        tenant_service_accounts=e.allow_lists("TENANT_SERVICE_ACCOUNTS"),
    )
    if not settings.dev_mode and not settings.worker_token:
        e.problems.append("JENNAH_WORKER_TOKEN (required unless JENNAH_DEV_MODE=1)")
    e.check("worker")
    return settings


def load_gateway_settings(env: Mapping[str, str] | None = None) -> GatewaySettings:
    """Gateway settings from ``env`` (default: ``os.environ``); ``SettingsError`` if bad."""
    e = _Env(os.environ if env is None else env)
    home = jennah_home(e.env)
    endpoints = tuple(
        u.strip().rstrip("/") for u in e.text("WORKER_ENDPOINTS").split(",") if u.strip()
    )
    for url in endpoints:
        if not url.startswith(("http://", "https://")):
            e.problems.append(f"WORKER_ENDPOINTS entry {url!r} (expected http://host:port)")
    discover = e.flag("GATEWAY_DISCOVER_WORKERS")
    if not endpoints and not discover:
        e.problems.append("WORKER_ENDPOINTS (or GATEWAY_DISCOVER_WORKERS=1)")
    settings = GatewaySettings(
        host=e.text("HOST", "127.0.0.1"),
        port=e.port("GATEWAY_PORT", 8080),
        dev_mode=e.flag("JENNAH_DEV_MODE"),
        worker_token=e.text("JENNAH_WORKER_TOKEN"),
        worker_endpoints=endpoints,
        health_interval_seconds=e.number("GATEWAY_HEALTH_INTERVAL_SECONDS", 2.0, float, 0.05),
        forward_timeout_seconds=e.number("GATEWAY_FORWARD_TIMEOUT_SECONDS", 30.0, float, 0.1),
        api_keys_file=e.text("JENNAH_API_KEYS_FILE"),
        server=e.choice("JENNAH_SERVER", SERVERS, "uvicorn"),
        read_max_bytes=e.number("READ_MAX_BYTES", 1024 * 1024, int, 1024),
        discover_from_store=discover,
        shutdown_grace_seconds=e.number("SHUTDOWN_GRACE_SECONDS", 8.0, float),
        store=_store_settings(e, home) if discover else StoreSettings(),
    )
    if not settings.dev_mode and not settings.worker_token:
        e.problems.append("JENNAH_WORKER_TOKEN (required unless JENNAH_DEV_MODE=1)")
    # Outside dev mode every RPC needs an API key or a proxy identity, and both live in the
    # key file, so a gateway without one could only refuse everything: refuse to start.
    if not settings.dev_mode and not settings.api_keys_file:
        e.problems.append("JENNAH_API_KEYS_FILE (required unless JENNAH_DEV_MODE=1)")
    proxies = tuple(p.strip() for p in e.text("JENNAH_TRUSTED_PROXIES").split(",") if p.strip())
    for entry in proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            e.problems.append(f"JENNAH_TRUSTED_PROXIES entry {entry!r} (expected an IP or CIDR)")
    if proxies and settings.dev_mode and not settings.api_keys_file:
        e.problems.append("JENNAH_API_KEYS_FILE (its identities map is needed by "
                          "JENNAH_TRUSTED_PROXIES)")
    e.check("gateway")
    return replace(settings, trusted_proxies=proxies)
