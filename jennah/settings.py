"""Typed, frozen settings, read once from the environment at start-up (docs/design.md §7, §11).

Nothing below ``main`` reads ``os.environ``: settings objects are passed in through
constructors. A failure names **every** missing or invalid variable in one line.

This module reads what every process shares. The batch provider and the job store are
chosen here by name (``BATCH_PROVIDER``, ``DB_PROVIDER``) but read their own variables
themselves: each backend module declares a small settings dataclass whose ``from_env``
reads them with :class:`Env`, and the backend's ``from_settings`` reads it from the
environment kept in :class:`ProviderSettings` / :class:`StoreSettings` (``read``), before
it creates a client or touches the network. This module knows no backend by name (it
imports neither ``providers`` nor ``database``). A caller that passes the registries
(``providers.PROVIDERS``, ``database.STORES``) to the ``load_*`` functions gets the
chosen backends' variables checked there too, in the same one line; without them they
are checked when the backend is built (``create_provider``, ``create_store``), which the
roles do before serving.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, TypeVar

from jennah.errors import SettingsError
from jennah.models import TENANT_RE
from jennah.registry import load

T = TypeVar("T")

SERVERS = ("uvicorn", "hypercorn", "pyvoy")

# A browser origin as it appears in the Origin header: no path, no wildcard (a "*" would
# let every site on the web call the API with a user's key).
_ORIGIN = re.compile(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def _items(value: str) -> frozenset[str]:
    """``a, b,,c`` → ``{a, b, c}``."""
    return frozenset(filter(None, (v.strip() for v in value.split(","))))


def jennah_home(env: Mapping[str, str]) -> Path:
    return Path(env.get("JENNAH_HOME") or Path(env.get("HOME") or "~").expanduser() / ".jennah")


class Env:
    """Reads variables and collects every problem instead of stopping at the first.

    Each backend's settings dataclass reads its own variables with one (``from_env``).
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def text(self, name: str, default: str = "") -> str:
        return self.env.get(name, "").strip() or default

    def path(self, name: str, default: Path) -> Path:
        return Path(self.text(name, str(default))).expanduser()

    def region(self) -> str:
        """``BATCH_REGION``, else ``AWS_REGION``: the region of every backend that has one."""
        return self.text("BATCH_REGION") or self.text("AWS_REGION")

    @property
    def home(self) -> Path:
        """``JENNAH_HOME``: the parent of every default directory and file."""
        return jennah_home(self.env)

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
            known = TENANT_RE.fullmatch(tenant) or (default and tenant == "*")
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


class _Chosen:
    """A backend chosen by name, with the environment it reads its own variables from."""

    role: ClassVar[str]
    env: Mapping[str, str]

    def read(self, from_env: Callable[[Env], T]) -> T:
        """The chosen backend's own settings, read by ``from_env`` (the classmethod of its
        settings dataclass) from ``env``; ``SettingsError`` naming every problem."""
        e = Env(self.env)
        value = from_env(e)
        e.check(self.role)
        return value


@dataclass(frozen=True)
class StoreSettings(_Chosen):
    """The job store: ``DB_PROVIDER``, and the environment the store reads the rest from
    (its module's settings dataclass, e.g. ``database/postgres.py``)."""

    role: ClassVar[str] = "job store"
    kind: str = "sqlite"
    env: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ProviderSettings(_Chosen):
    """The batch provider: ``BATCH_PROVIDER``, and the environment the provider reads the
    rest from (its module's settings dataclass, e.g. ``providers/aws.py``)."""

    role: ClassVar[str] = "batch provider"
    kind: str = "local"
    env: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class AdmissionSettings:
    """SubmitJob admission limits (``worker/admission.py``); 0 disables a limit, and
    ``provider_submit_rate=None`` means the provider's published default."""

    tenant_submit_rate: float = 50.0
    tenant_submit_burst: int = 200
    tenant_max_active_jobs: int = 1000
    provider_submit_rate: float | None = None
    # The tasks of a tenant's non-terminal jobs (a job of N tasks counts N).
    tenant_max_active_tasks: int = 100_000


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
    # JENNAH_CORS_ORIGINS: the browser origins allowed to call the API (jennah/asgi.py
    # with_cors); empty: no CORS answers at all.
    cors_origins: tuple[str, ...] = ()


# The registries a caller may pass (``providers.PROVIDERS``, ``database.STORES``): name →
# ``"module:Class"``. Without them the backends check their own variables when built.
Backends = Mapping[str, str]


def _chosen(e: Env, variable: str, default: str, table: Backends | None) -> str:
    """The backend named by ``variable``. Given its registry, also check that name and
    read the backend's own variables into ``e`` (through its class's ``settings_class``,
    when it has one), so that one line names every problem."""
    kind = e.text(variable, default).lower()
    if table is None:
        return kind
    if kind not in table:
        e.problems.append(f"{variable}={kind!r} (expected one of {', '.join(table)})")
        return kind
    try:
        backend = load(table, kind, variable)
    except SettingsError as exc:  # its optional dependency is missing
        e.problems.append(str(exc))
        return kind
    settings_class = getattr(backend, "settings_class", None)
    if settings_class is not None:
        settings_class.from_env(e)
    return kind


def _store_settings(e: Env, stores: Backends | None) -> StoreSettings:
    return StoreSettings(kind=_chosen(e, "DB_PROVIDER", "sqlite", stores), env=dict(e.env))


def _provider_settings(e: Env, providers: Backends | None) -> ProviderSettings:
    return ProviderSettings(kind=_chosen(e, "BATCH_PROVIDER", "local", providers),
                            env=dict(e.env))


def _admission_settings(e: Env) -> AdmissionSettings:
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
        tenant_max_active_tasks=e.number("TENANT_MAX_ACTIVE_TASKS", d.tenant_max_active_tasks,
                                         int),
        provider_submit_rate=None if provider_rate < 0 else provider_rate,
    )


def load_store_settings(
    env: Mapping[str, str] | None = None, *, stores: Backends | None = None
) -> StoreSettings:
    """Only the job store settings (for ``jennah db migrate`` and the WAL tools)."""
    e = Env(os.environ if env is None else env)
    settings = _store_settings(e, stores)
    e.check("store")
    return settings


def load_worker_settings(
    env: Mapping[str, str] | None = None,
    *,
    providers: Backends | None = None,
    stores: Backends | None = None,
) -> WorkerSettings:
    """Worker settings from ``env`` (default: ``os.environ``); ``SettingsError`` if bad.
    With ``providers`` and ``stores``, the chosen backends' own variables are checked in
    the same pass (module docstring)."""
    e = Env(os.environ if env is None else env)
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
        wal_dir=e.path("WAL_DIR", e.home / "wal"),
        archive_dir=e.path("ARCHIVE_DIR", e.home / "archive"),
        wal_retention_days=e.number("WAL_RETENTION_DAYS", 30.0, float),
        read_max_bytes=e.number("READ_MAX_BYTES", 1024 * 1024, int, 1024),
        store=_store_settings(e, stores),
        provider=_provider_settings(e, providers),
        admission=_admission_settings(e),
        wal_segment_bytes=e.number("WAL_SEGMENT_BYTES", 16 << 20, int, 4096),
        wal_max_pending_bytes=e.number("WAL_MAX_PENDING_BYTES", 256 << 20, int, 1 << 20),
        tenant_service_accounts=e.allow_lists("TENANT_SERVICE_ACCOUNTS"),
    )
    if not settings.dev_mode and not settings.worker_token:
        e.problems.append("JENNAH_WORKER_TOKEN (required unless JENNAH_DEV_MODE=1)")
    e.check("worker")
    return settings


def load_gateway_settings(
    env: Mapping[str, str] | None = None, *, stores: Backends | None = None
) -> GatewaySettings:
    """Gateway settings from ``env`` (default: ``os.environ``); ``SettingsError`` if bad.
    With ``stores``, the job store's own variables are checked too (when it is used)."""
    e = Env(os.environ if env is None else env)
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
        store=_store_settings(e, stores) if discover else StoreSettings(),
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
    origins = tuple(o.strip() for o in e.text("JENNAH_CORS_ORIGINS").split(",") if o.strip())
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            e.problems.append(f"JENNAH_CORS_ORIGINS entry {origin!r} (expected an origin such "
                              "as https://console.example.com: scheme, host, optional port)")
    e.check("gateway")
    return replace(settings, trusted_proxies=proxies, cors_origins=origins)
