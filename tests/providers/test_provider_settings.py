"""Provider settings (docs/design.md §7, §11) and the pieces the three cloud providers share:
start-up validation naming every missing variable, the region rules, the registry (every
provider built from settings through it, and every one under the contract), the retry
policy and resource resolution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from database import STORES
from jennah.errors import (
    ProviderQuotaExceeded,
    ProviderRejected,
    ProviderUnavailable,
    SettingsError,
)
from jennah.models import JobSpec, ResourceOverride
from jennah.settings import ProviderSettings, load_worker_settings
from providers import PROVIDERS, create_provider
from providers.aws import AwsSettings
from providers.resources import Resources, resolve
from providers.retry import RetryPolicy
from tests.providers.provider_contract import NOT_UNDER_CONTRACT, contract_runs


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"JENNAH_HOME": str(tmp_path), "JENNAH_DEV_MODE": "1", **extra}


@pytest.mark.parametrize(("provider", "missing"), [
    ("gcp", ["BATCH_PROJECT_ID", "BATCH_REGION"]),
    ("aws", ["AWS_JOB_QUEUE", "AWS_JOB_DEFINITION", "BATCH_REGION or AWS_REGION"]),
    ("azure", ["AZURE_BATCH_ENDPOINT", "AZURE_BATCH_POOL_ID"]),
])
def test_missing_provider_settings_are_named_in_one_line(
    tmp_path: Path, provider: str, missing: list[str]
) -> None:
    env = base_env(tmp_path, BATCH_PROVIDER=provider, WORKER_LEASE_TTL_SECONDS="soon")
    with pytest.raises(SettingsError) as at_start:  # with the registries: one line for all
        load_worker_settings(env, providers=PROVIDERS, stores=STORES)
    assert "WORKER_LEASE_TTL_SECONDS" in str(at_start.value)
    settings = load_worker_settings({**env, "WORKER_LEASE_TTL_SECONDS": "30"})
    with pytest.raises(SettingsError) as when_built:  # without: when the provider is built
        create_provider(settings.provider)
    for text in (str(at_start.value), str(when_built.value)):
        assert "\n" not in text
        for name in missing:
            assert f"{name} (required by BATCH_PROVIDER={provider})" in text, text
        assert text.count("(required by") == len(missing), text


def test_one_missing_variable_among_present_ones(tmp_path: Path) -> None:
    env = base_env(tmp_path, BATCH_PROVIDER="aws", AWS_REGION="eu-west-1",
                   AWS_JOB_DEFINITION="jennah-def")
    with pytest.raises(SettingsError, match=r"AWS_JOB_QUEUE \(required") as info:
        load_worker_settings(env, providers=PROVIDERS)
    assert "AWS_JOB_DEFINITION" not in str(info.value) and "AWS_REGION" not in str(info.value)


def test_an_unknown_provider_is_named_with_the_known_ones(tmp_path: Path) -> None:
    env = base_env(tmp_path, BATCH_PROVIDER="Slurm")
    known = r"\(expected one of local, gcp, aws, azure, dry, fake\)"
    with pytest.raises(SettingsError, match=rf"invalid worker settings: .*BATCH_PROVIDER='slurm' "
                                            rf"{known}"):
        load_worker_settings(env, providers=PROVIDERS, stores=STORES)
    with pytest.raises(SettingsError, match=rf"BATCH_PROVIDER='slurm' {known}"):
        create_provider(load_worker_settings(env).provider)


def test_region_rules(tmp_path: Path) -> None:
    aws = {"BATCH_PROVIDER": "aws", "AWS_JOB_QUEUE": "q", "AWS_JOB_DEFINITION": "d"}

    def region(**env: str) -> str:
        settings = load_worker_settings(base_env(tmp_path, **aws, **env), providers=PROVIDERS)
        return settings.provider.read(AwsSettings.from_env).region

    assert region(AWS_REGION="eu-west-1") == "eu-west-1"  # AWS_REGION is honoured
    assert region(AWS_REGION="eu-west-1", BATCH_REGION="us-east-2") == "us-east-2"
    # GCP needs BATCH_REGION itself; Azure takes its region from the endpoint.
    gcp = base_env(tmp_path, BATCH_PROVIDER="gcp", BATCH_PROJECT_ID="p", AWS_REGION="eu-west-1")
    with pytest.raises(SettingsError, match=r"BATCH_REGION \(required by BATCH_PROVIDER=gcp"):
        load_worker_settings(gcp, providers=PROVIDERS)
    load_worker_settings(base_env(
        tmp_path, BATCH_PROVIDER="azure", AZURE_BATCH_POOL_ID="pool",
        AZURE_BATCH_ENDPOINT="https://acct.westeurope.batch.azure.com"), providers=PROVIDERS)


def test_aws_provider_from_settings_uses_region_queue_and_endpoint() -> None:
    settings = ProviderSettings(kind="aws", env={
        "BATCH_REGION": "eu-central-1", "AWS_JOB_QUEUE": "q", "AWS_JOB_DEFINITION": "d",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    provider = create_provider(settings)
    try:
        assert provider.name == "aws"
        client = provider.client  # type: ignore[attr-defined]
        assert client.meta.region_name == "eu-central-1"
        assert client.meta.endpoint_url == "http://127.0.0.1:9"
        assert (provider.job_queue, provider.job_definition) == ("q", "d")  # type: ignore[attr-defined]
    finally:
        provider.close()


def test_gcp_without_credentials_fails_start_up_with_a_settings_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    settings = ProviderSettings(kind="gcp", env={"BATCH_REGION": "us-central1",
                                                 "BATCH_PROJECT_ID": "p"})
    with pytest.raises(SettingsError, match="BATCH_PROVIDER=gcp: no Google credentials"):
        create_provider(settings)


# --- the registry -------------------------------------------------------------------------


def test_every_registered_provider_runs_the_contract() -> None:
    runs = contract_runs()
    missing = sorted(set(PROVIDERS) - set(runs) - set(NOT_UNDER_CONTRACT))
    assert not missing, f"registered providers without a contract run: {missing}"
    assert not set(runs) & set(NOT_UNDER_CONTRACT)
    assert set(NOT_UNDER_CONTRACT) <= set(PROVIDERS)


def test_the_settings_kernel_imports_no_backend() -> None:
    code = ("import sys, jennah.settings; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('providers', 'database')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"


# --- the retry policy ---------------------------------------------------------------------


def test_backoff_is_capped_full_jitter() -> None:
    def down() -> None:
        raise ProviderUnavailable("503")

    for r, want in [(0.999, [0.1998, 0.3996, 0.7992, 1.5984, 3.1968, 4.995, 4.995]),
                    (0.0, [0.0] * 7)]:
        sleeps: list[float] = []
        with pytest.raises(ProviderUnavailable):
            RetryPolicy(attempts=8, sleep=sleeps.append, random=lambda r=r: r).call("down", down)
        assert sleeps == pytest.approx(want)  # base 0.2, doubling, capped at 5.0


def test_retry_retries_retryable_errors_a_bounded_number_of_times() -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=3, base_seconds=1.0, cap_seconds=10.0, sleep=sleeps.append,
                         random=lambda: 0.5)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ProviderUnavailable("429")
        return "ok"

    assert policy.call("flaky", flaky) == "ok"
    assert sleeps == [0.5, 1.0]

    def down() -> str:
        calls.append(1)
        raise ProviderQuotaExceeded("quota")  # retryable too

    calls.clear()
    with pytest.raises(ProviderQuotaExceeded):
        policy.call("down", down)
    assert len(calls) == 3


def test_retry_never_repeats_a_rejection() -> None:
    calls: list[int] = []

    def rejected() -> None:
        calls.append(1)
        raise ProviderRejected("bad spec")

    with pytest.raises(ProviderRejected):
        RetryPolicy(sleep=lambda _s: None).call("rejected", rejected)
    assert calls == [1]
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(attempts=0)


# --- resources --------------------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "override", "expected"), [
    ("small", ResourceOverride(), Resources(1000, 2048, 0)),
    ("medium", ResourceOverride(), Resources(2000, 4096, 0)),
    ("large", ResourceOverride(), Resources(4000, 8192, 0)),
    ("xlarge", ResourceOverride(), Resources(8000, 16384, 0)),
    ("", ResourceOverride(), Resources(1000, 2048, 0)),
    ("large", ResourceOverride(cpu_millis=500), Resources(500, 8192, 0)),
    ("large", ResourceOverride(memory_mib=1024, max_run_duration_seconds=90),
     Resources(4000, 1024, 90)),
])
def test_profile_and_override(profile: str, override: ResourceOverride,
                              expected: Resources) -> None:
    assert resolve(JobSpec(image_uri="x", resource_profile=profile,
                           resource_override=override)) == expected


def test_vcpus_and_unknown_profiles() -> None:
    assert [Resources(m, 1).vcpus for m in (250, 1000, 1500, 16000)] == ["0.25", "1", "1.5", "16"]
    with pytest.raises(ProviderRejected, match="unknown resource profile 'huge'"):
        resolve(JobSpec(image_uri="x", resource_profile="huge"))


def test_tenant_service_accounts_are_parsed_and_checked(tmp_path: Path) -> None:
    base = {"JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(tmp_path)}
    settings = load_worker_settings({**base, "TENANT_SERVICE_ACCOUNTS":
                                     " acme = a@p.iam , b@p.iam ; beta=c@p.iam;acme=d@p.iam"})
    assert settings.tenant_service_accounts == {
        "acme": frozenset({"a@p.iam", "b@p.iam", "d@p.iam"}), "beta": frozenset({"c@p.iam"})}
    assert load_worker_settings(base).tenant_service_accounts == {}
    for bad in ("acme", "Acme=a@p.iam", "acme=", "=a@p.iam"):
        with pytest.raises(SettingsError, match="TENANT_SERVICE_ACCOUNTS"):
            load_worker_settings({**base, "TENANT_SERVICE_ACCOUNTS": bad})
