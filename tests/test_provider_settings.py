"""Cloud provider settings (docs/design.md §7, §11) and the pieces the three cloud providers share:
start-up validation naming every missing variable, the region rules, building each
provider from settings through the registry, the retry policy and resource resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from jennah.errors import (
    ProviderQuotaExceeded,
    ProviderRejected,
    ProviderUnavailable,
    SettingsError,
)
from jennah.models import JobSpec, ResourceOverride
from jennah.settings import REQUIRED_BY_PROVIDER, ProviderSettings, load_worker_settings
from providers import create_provider
from providers.resources import Resources, resolve
from providers.retry import RetryPolicy, backoff_delay


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
    with pytest.raises(SettingsError) as info:
        load_worker_settings(base_env(tmp_path, BATCH_PROVIDER=provider))
    text = str(info.value)
    assert "\n" not in text
    for name in missing:
        assert f"{name} (required by BATCH_PROVIDER={provider})" in text, text
    assert len(missing) == len(REQUIRED_BY_PROVIDER[provider])


def test_one_missing_variable_among_present_ones(tmp_path: Path) -> None:
    env = base_env(tmp_path, BATCH_PROVIDER="aws", AWS_REGION="eu-west-1",
                   AWS_JOB_DEFINITION="jennah-def")
    with pytest.raises(SettingsError, match=r"AWS_JOB_QUEUE \(required") as info:
        load_worker_settings(env)
    assert "AWS_JOB_DEFINITION" not in str(info.value) and "AWS_REGION" not in str(info.value)


def test_region_rules(tmp_path: Path) -> None:
    aws = {"BATCH_PROVIDER": "aws", "AWS_JOB_QUEUE": "q", "AWS_JOB_DEFINITION": "d"}
    only_aws = load_worker_settings(base_env(tmp_path, **aws, AWS_REGION="eu-west-1"))
    assert only_aws.provider.region == "eu-west-1"  # AWS_REGION is honoured
    both = load_worker_settings(base_env(tmp_path, **aws, AWS_REGION="eu-west-1",
                                         BATCH_REGION="us-east-2"))
    assert both.provider.region == "us-east-2"  # BATCH_REGION is the region for all
    azure = load_worker_settings(base_env(
        tmp_path, BATCH_PROVIDER="azure", AZURE_BATCH_POOL_ID="pool",
        AZURE_BATCH_ENDPOINT="https://acct.westeurope.batch.azure.com"))
    assert azure.provider.region == ""  # Azure takes its region from the endpoint


def test_aws_provider_from_settings_uses_region_queue_and_endpoint() -> None:
    settings = ProviderSettings(kind="aws", region="eu-central-1", aws_job_queue="q",
                                aws_job_definition="d",
                                aws_endpoint_url="http://127.0.0.1:9")
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
    settings = ProviderSettings(kind="gcp", region="us-central1", gcp_project_id="p")
    with pytest.raises(SettingsError, match="BATCH_PROVIDER=gcp: no Google credentials"):
        create_provider(settings)


# --- the retry policy ---------------------------------------------------------------------


def test_backoff_is_capped_full_jitter() -> None:
    assert backoff_delay(0, 0.2, 5.0, lambda: 0.999) == pytest.approx(0.1998)
    assert backoff_delay(3, 0.2, 5.0, lambda: 0.5) == pytest.approx(0.8)
    assert backoff_delay(10, 0.2, 5.0, lambda: 0.999) == pytest.approx(4.995)  # capped
    assert backoff_delay(10, 0.2, 5.0, lambda: 0.0) == 0.0


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
