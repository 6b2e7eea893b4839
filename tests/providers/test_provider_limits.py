"""``check_spec``: what a provider would refuse, or could not honour, is refused at
SubmitJob as ``invalid_argument`` before anything is stored (docs/providers.md)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from database.memory import MemoryStore
from jennah.errors import InvalidArgument
from jennah.models import JobFilter, JobSpec
from providers.base import Capabilities, check_spec
from providers.local import LocalProvider
from worker.jobs import JobService

SPEC = JobSpec(image_uri="busybox", commands=("true",))
LIMITED = Capabilities(max_labels=2, reserved_label_prefixes=("goog-",),
                       reserved_label_keys=frozenset({"batch-job-id"}), machine_type=False,
                       spot=False, accelerator_type=False, accelerator_count=True)


@pytest.mark.parametrize(("change", "message"), [
    ({"labels": {"a": "1", "b": "2", "c": "3"}}, "3 given; the p provider takes at most 2"),
    ({"labels": {"goog-x": "1"}}, "key 'goog-x' is reserved"),
    ({"labels": {"batch-job-id": "1"}}, "key 'batch-job-id' is reserved"),
    ({"machine_type": "n1-standard-4"}, "machine_type: the p provider cannot honour it"),
    ({"use_spot_vms": True, "accelerator_type": "nvidia-tesla-t4", "accelerator_count": 1},
     "use_spot_vms, accelerator.type: the p provider cannot honour them"),
])
def test_refusals_name_the_field_and_the_provider(change: dict[str, object],
                                                  message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_spec("p", LIMITED, dataclasses.replace(SPEC, **change))  # type: ignore[arg-type]


def test_what_a_provider_honours_passes() -> None:
    check_spec("p", LIMITED, dataclasses.replace(SPEC, labels={"a": "1", "b": "2"},
                                                 accelerator_count=2))
    check_spec("p", Capabilities(), dataclasses.replace(
        SPEC, labels={f"k{i}": "v" for i in range(64)}, machine_type="e2-small",
        use_spot_vms=True))


def test_the_local_provider_refuses_what_it_cannot_run_and_stores_nothing(
        tmp_path: Path) -> None:
    store = MemoryStore()
    jobs = JobService(store, LocalProvider(tmp_path), worker_id="w1", lease_ttl=30,
                      service_accounts={"acme": frozenset({"runner@p.iam.gserviceaccount.com"})})
    for change in ({"machine_type": "n1-standard-4"}, {"use_spot_vms": True},
                   {"accelerator_type": "nvidia-tesla-t4", "accelerator_count": 1},
                   {"accelerator_count": 1}, {"boot_disk_size_gb": 50},
                   {"service_account": "runner@p.iam.gserviceaccount.com"}):
        with pytest.raises(InvalidArgument, match="the local provider cannot honour"):
            asyncio.run(jobs.submit("acme", dataclasses.replace(SPEC, **change), "r"))  # type: ignore[arg-type]
    assert store.list_jobs("acme", JobFilter(), 10, "").jobs == []


def test_a_provider_may_need_the_gpu_type_with_the_count() -> None:
    caps = Capabilities(accelerator_type=True, accelerator_count=True,
                        accelerator_type_required=True)
    with pytest.raises(InvalidArgument, match=r"accelerator\.type: the gcp provider needs it"):
        check_spec("gcp", caps, dataclasses.replace(SPEC, accelerator_count=1))
    check_spec("gcp", caps, dataclasses.replace(SPEC, accelerator_type="nvidia-l4",
                                                accelerator_count=1))
