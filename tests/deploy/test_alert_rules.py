"""deploy/alerts.yml: the shape ``promtool check rules`` expects, valid durations, every
metric an expression uses exported by Jennah, and every runbook link pointing at a real
section of docs/runbook.md.

The exported names come from the code: a worker app and a gateway app are built on
private registries (nothing is served) and their exposition text is parsed, so the
set is exactly what ``/metrics`` would serve.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app as create_gateway
from jennah.settings import load_gateway_settings, load_worker_settings
from tests.helpers import REPO
from worker.app import create_app as create_worker

RULES = Path(REPO) / "deploy" / "alerts.yml"
RUNBOOK = Path(REPO) / "docs" / "runbook.md"
# Recorded by Prometheus itself for every scrape target, not by the target.
PROMETHEUS_BUILTIN = {"up"}

_DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
}
_AGGREGATION_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*")


def is_duration(text: str) -> bool:
    return bool(text) and _DURATION.fullmatch(text) is not None


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label matchers,
    label lists and range durations removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors / subqueries
    text = _AGGREGATION_LISTS.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end():].lstrip()
        if rest.startswith("("):  # a function or an aggregation operator
            continue
        if m.group().lower() in _PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, method) (rate(x_bucket{method!="W",a=~"b|c"}'
            '[5m]))) > 2 and on (instance) y_total offset 5m / ignoring(job) z * 1e3')
    assert metric_names(expr) == {"x_bucket", "y_total", "z"}
    assert is_duration("5m") and is_duration("1h30m") and is_duration("90s")
    assert not is_duration("5 m") and not is_duration("m5") and not is_duration("")


def exported_metric_names(tmp_path: Path) -> set[str]:
    """Sample names a worker and a gateway expose (histograms with their suffixes)."""
    worker_registry, gateway_registry = CollectorRegistry(), CollectorRegistry()
    wenv = {"JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(tmp_path), "WORKER_ID": "ar-1",
            "BATCH_PROVIDER": "dry"}
    create_worker(load_worker_settings(wenv), registry=worker_registry)
    genv = {"JENNAH_DEV_MODE": "1", "WORKER_ENDPOINTS": "http://127.0.0.1:9"}
    create_gateway(load_gateway_settings(genv), registry=gateway_registry)
    names: set[str] = set()
    for registry in (worker_registry, gateway_registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created"),
            }.get(family.type, ("",))
            names.update(family.name + s for s in suffixes)
            names.update(s.name for s in family.samples)
    return names


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    assert isinstance(doc, dict) and set(doc) == {"groups"}
    groups = doc["groups"]
    assert isinstance(groups, list) and groups
    found: list[dict[str, Any]] = []
    group_names = [g["name"] for g in groups]
    assert len(set(group_names)) == len(group_names), "group names must be unique"
    for group in groups:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group.keys()
        assert isinstance(group["name"], str) and group["name"]
        assert isinstance(group["rules"], list) and group["rules"]
        found.extend(group["rules"])
    return found


def test_rules_have_the_promtool_shape(rules: list[dict[str, Any]]) -> None:
    alerts = [r["alert"] for r in rules]
    assert len(set(alerts)) == len(alerts), "alert names are unique"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels",
                             "annotations"}, rule.keys()
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]), rule["alert"]
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        assert is_duration(str(rule["for"])), (rule["alert"], rule["for"])
        labels, annotations = rule["labels"], rule["annotations"]
        assert labels["severity"] in {"page", "warning", "ticket", "info"}
        assert all(isinstance(v, str) for v in [*labels.values(), *annotations.values()])
        assert annotations["summary"]
        for window in re.findall(r"\[([^\]]*)\]", rule["expr"]):
            assert is_duration(window), (rule["alert"], window)


def test_every_metric_in_an_expression_is_exported(
    rules: list[dict[str, Any]], tmp_path: Path
) -> None:
    exported = exported_metric_names(tmp_path) | PROMETHEUS_BUILTIN
    used: dict[str, str] = {}
    for rule in rules:
        for name in metric_names(rule["expr"]):
            used[name] = rule["alert"]
    unknown = {name: alert for name, alert in used.items() if name not in exported}
    assert not unknown, f"metrics not exported by jennah: {unknown}"
    # The extraction found the metrics (not an empty set passing vacuously).
    assert {"wal_pending_events", "jennah_worker_requests_total",
            "jennah_gateway_worker_up"} <= set(used)


def _anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_runbook_links_point_at_sections(rules: list[dict[str, Any]]) -> None:
    anchors = _anchors(RUNBOOK.read_text())
    for rule in rules:
        link = rule["annotations"]["runbook"]
        path, _, anchor = link.partition("#")
        assert path == "docs/runbook.md" and anchor in anchors, (rule["alert"], link)
    # And the runbook's alert table names every alert.
    text = RUNBOOK.read_text()
    missing = [r["alert"] for r in rules if r["alert"] not in text]
    assert not missing, missing
