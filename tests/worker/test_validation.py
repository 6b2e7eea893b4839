"""Validation rules of docs/design.md §8: good input passes, each bad field is named."""

from __future__ import annotations

import pytest

from jennah.errors import InvalidArgument
from jennah.models import ResourceOverride, validate_tenant
from worker.validation import (
    validate_commands,
    validate_env,
    validate_image,
    validate_labels,
    validate_spec,
)


@pytest.mark.parametrize(
    "image",
    [
        "busybox",
        "busybox:1.36",
        "library/busybox:latest",
        "gcr.io/my-project/app:v1.2.3",
        "localhost:5000/team/app",
        "us-docker.pkg.dev/p/r/img@sha256:" + "a" * 64,
        "ghcr.io/org/img:tag@sha256:" + "0123456789abcdef" * 4,
    ],
)
def test_good_images(image: str) -> None:
    assert validate_image(image) == image


@pytest.mark.parametrize(
    "image",
    ["", "Busybox", "busy box", "busybox:", ":tag", "a//b", "-x", "busybox@sha256:short",
     "x" * 600, "img:" + "t" * 200, "ubuntu;rm -rf /"],
)
def test_bad_images(image: str) -> None:
    with pytest.raises(InvalidArgument, match="image_uri"):
        validate_image(image)


@pytest.mark.parametrize("tenant", ["acme", "a", "team-42", "0x", "a" * 63])
def test_good_tenants(tenant: str) -> None:
    assert validate_tenant(tenant) == tenant


@pytest.mark.parametrize("tenant", ["", "Acme", "-acme", "a_b", "a" * 64, "acme!", "ac me"])
def test_bad_tenants(tenant: str) -> None:
    with pytest.raises(InvalidArgument, match="tenant"):
        validate_tenant(tenant)


def test_env_rules() -> None:
    assert validate_env({"A": "1", "_x9": ""}) == {"A": "1", "_x9": ""}
    for bad in ("1A", "A-B", "", "A B", "é"):
        with pytest.raises(InvalidArgument, match="env var name"):
            validate_env({bad: "v"})
    with pytest.raises(InvalidArgument, match="at most 100"):
        validate_env({f"V{i}": "x" for i in range(101)})
    with pytest.raises(InvalidArgument, match="over 32768 bytes") as err:
        validate_env({"SECRET": "s3cr3t" * 10_000})
    assert "s3cr3t" not in str(err.value)  # values are secrets: never echoed


def test_commands_and_labels() -> None:
    assert validate_commands(["sh", "-c", "echo hi"]) == ("sh", "-c", "echo hi")
    with pytest.raises(InvalidArgument, match="at most 1000"):
        validate_commands(["x"] * 1001)
    with pytest.raises(InvalidArgument, match="NUL"):
        validate_commands(["a\x00b"])
    assert validate_labels({"team": "ml", "env": "prod-1"}) == {"team": "ml", "env": "prod-1"}
    with pytest.raises(InvalidArgument, match="labels key"):
        validate_labels({"Team": "x"})
    with pytest.raises(InvalidArgument, match="value"):
        validate_labels({"team": "ML Team"})


def _spec(**kw: object) -> object:
    args: dict[str, object] = dict(
        image_uri="busybox", commands=["true"], env_vars={}, name="n", labels={},
        resource_profile="", override=ResourceOverride(), machine_type="",
        boot_disk_size_gb=0, use_spot_vms=False, service_account="", max_retries=0,
    )
    args.update(kw)
    return validate_spec(**args)  # type: ignore[arg-type]


def test_spec_defaults_and_ranges() -> None:
    spec = _spec()
    assert spec.resource_profile == "small"  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match="resource_profile"):
        _spec(resource_profile="huge")
    with pytest.raises(InvalidArgument, match="max_retries"):
        _spec(max_retries=11)
    with pytest.raises(InvalidArgument, match="cpu_millis"):
        _spec(override=ResourceOverride(cpu_millis=-1))
    with pytest.raises(InvalidArgument, match="machine_type"):
        _spec(machine_type="N2 Standard")


def test_accelerator_rules() -> None:
    spec = _spec(accelerator_type="nvidia-tesla-t4")
    assert (spec.accelerator_type, spec.accelerator_count) == ("nvidia-tesla-t4", 1)  # type: ignore[attr-defined]
    assert _spec(accelerator_count=4).accelerator_count == 4  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match=r"accelerator\.type"):
        _spec(accelerator_type="NVIDIA Tesla")
    with pytest.raises(InvalidArgument, match=r"accelerator\.count"):
        _spec(accelerator_count=17)
    with pytest.raises(InvalidArgument, match=r"accelerator\.count"):
        _spec(accelerator_count=-1)
