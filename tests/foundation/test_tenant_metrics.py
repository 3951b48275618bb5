"""Per-tenant metrics in a bounded number of series (``aura.tenant_labels``): no tenant id
is a label value unless METRICS_TENANTS names it. Real deliveries of a resilient task,
eager, in process (Celery's in-memory broker, the embedded Redis stand-in)."""

from __future__ import annotations

import uuid

import pytest
from celery import Celery
from prometheus_client import REGISTRY

from aura.config import get_settings, load_settings
from aura.errors import ConfigurationError
from aura.messaging import resilient_task
from aura.metrics import tenant_label
from aura.tenant_labels import MAX_NAMED, NONE, OTHER, parse_metrics_tenants
from aura.worker.celery_app import make_celery_app
from tests.helpers import metric

pytestmark = pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")

BY_TENANT = "aura_task_outcomes_by_tenant_total"


@pytest.fixture(scope="module")
def app() -> Celery:
    app = make_celery_app(load_settings())  # in-memory broker; eager: deliveries run inline
    app.conf.task_always_eager = True
    return app


def deliver_for(app: Celery, tenants: list[str]) -> None:
    """One delivery per tenant: a success each, and a poison pill (dead-lettered) for the
    first; and one delivery that names no tenant."""

    @resilient_task(app=app, name=f"tests.tenant_metrics.{uuid.uuid4().hex[:8]}")
    def work(self: object, tenant_id: str, poison: bool = False) -> str:
        if poison:
            raise ValueError("a record no retry can fix")
        return tenant_id

    for tenant in tenants:
        assert work.apply(args=(tenant,)).get() == tenant
    work.apply(args=(tenants[0], True)).get(propagate=False)
    work.apply(kwargs={"poison": False}).get(propagate=False)  # no tenant_id: a bad call


def label_values() -> set[str]:
    return {
        value
        for family in REGISTRY.collect()
        for sample in family.samples
        for value in sample.labels.values()
    }


def test_with_metrics_tenants_unset_no_tenant_id_is_a_label_value(app: Celery) -> None:
    tenants = [str(uuid.uuid4()) for _ in range(40)]
    before = {o: metric(BY_TENANT, tenant=OTHER, outcome=o) for o in ("success", "dead_lettered")}
    before_none = metric(BY_TENANT, tenant=NONE, outcome="dead_lettered")

    deliver_for(app, tenants)

    assert not set(tenants) & label_values()
    assert metric(BY_TENANT, tenant=OTHER, outcome="success") == before["success"] + 40
    assert metric(BY_TENANT, tenant=OTHER, outcome="dead_lettered") == before["dead_lettered"] + 1
    assert metric(BY_TENANT, tenant=NONE, outcome="dead_lettered") == before_none + 1


def test_a_named_tenant_gets_its_own_series_and_the_rest_aggregate(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    named, *others = [str(uuid.uuid4()) for _ in range(10)]
    monkeypatch.setenv("METRICS_TENANTS", named.upper())  # any case: kept canonical
    get_settings.cache_clear()
    before_other = metric(BY_TENANT, tenant=OTHER, outcome="success")

    deliver_for(app, [named, *others])

    assert metric(BY_TENANT, tenant=named, outcome="success") == 1
    assert metric(BY_TENANT, tenant=named, outcome="dead_lettered") == 1
    assert metric(BY_TENANT, tenant=OTHER, outcome="success") == before_other + 9
    assert not set(others) & label_values()
    assert tenant_label(uuid.UUID(named)) == named  # a UUID object, or its text: one series
    assert tenant_label(str(uuid.uuid4())) == OTHER
    assert tenant_label(None) == NONE


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("other", "'other' is not a tenant id"),
        ("a b", "'a b' is not a tenant id"),
        (",".join(str(uuid.uuid4()) for _ in range(MAX_NAMED + 1)), "at most 100 tenants"),
    ],
)
def test_metrics_tenants_takes_tenant_ids_only_and_few_of_them(
    value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICS_TENANTS", value)
    with pytest.raises(ConfigurationError, match=message):
        load_settings()


def test_metrics_tenants_parses_to_canonical_ids() -> None:
    tenant = uuid.uuid4()
    assert parse_metrics_tenants(f" {str(tenant).upper()} , acme-1,, ") == {str(tenant), "acme-1"}
    assert parse_metrics_tenants("") == frozenset()
