"""/healthz (the process is up), /readyz (the database and the broker answer; Redis is
reported, not waited on: ``aura.gateway.readiness.ADVISORY_CHECKS``) and /metrics
(Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aura.gateway.readiness import ADVISORY_CHECKS
from aura.gateway.schemas import Health, Readiness
from aura.gateway.state import Current
from aura.metrics import exposition_registry

__all__ = ["healthz", "metrics", "readyz", "router"]

router = APIRouter()


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A dependency is unavailable"}},
    summary="The database and the broker answer (Redis reported, not waited on)",
)
async def readyz(gw: Current) -> JSONResponse:
    checks = await gw.readiness.checks()
    ready = all(value == "ok" for key, value in checks.items() if key not in ADVISORY_CHECKS)
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    summary="Prometheus exposition",
)
async def metrics() -> Response:
    return Response(generate_latest(exposition_registry()), media_type=CONTENT_TYPE_LATEST)
