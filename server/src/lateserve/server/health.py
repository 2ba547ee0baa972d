"""Per-service gRPC health: Info/Tokenize serve once the tokenizer is loaded; model services
serve while at least one worker is ready and only for tasks the model has."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

from lateserve.server.domain import ModelKind, ModelSpec, Task

SERVICE_PREFIX = "lateserve.v1."
INFO = SERVICE_PREFIX + "InfoService"
TOKENIZE = SERVICE_PREFIX + "TokenizeService"
RERANK = SERVICE_PREFIX + "RerankService"
SCORE = SERVICE_PREFIX + "ScoreService"
POOL = SERVICE_PREFIX + "PoolService"
EMBED = SERVICE_PREFIX + "EmbedService"
ALL_SERVICES = (INFO, TOKENIZE, RERANK, SCORE, POOL, EMBED)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def capable_services(spec: ModelSpec) -> set[str]:
    """Model services the loaded model can answer at all."""
    services = {POOL}
    if Task.EMBED in spec.tasks:
        services.add(EMBED)
    scorable = {
        ModelKind.LATE_INTERACTION: Task.TOKEN_EMBED,
        ModelKind.BI_ENCODER: Task.EMBED,
        ModelKind.CROSS_ENCODER: Task.CLASSIFY,
    }
    if scorable[spec.kind] in spec.tasks:
        services |= {RERANK, SCORE}
    return services


class HealthState:
    """Owns the health servicer and recomputes every status from (ready workers, draining)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.servicer = health.aio.HealthServicer()
        self._capable = capable_services(spec)
        self.ready_workers = 0
        self.draining = False

    async def update(self, ready_workers: int | None = None) -> None:
        if ready_workers is not None:
            self.ready_workers = ready_workers
        live = not self.draining
        models_up = live and self.ready_workers > 0
        for name in (INFO, TOKENIZE):
            await self.servicer.set(name, SERVING if live else NOT_SERVING)
        for name in (RERANK, SCORE, POOL, EMBED):
            await self.servicer.set(name, SERVING if models_up and name in self._capable else NOT_SERVING)
        await self.servicer.set("", SERVING if models_up else NOT_SERVING)

    async def drain(self) -> None:
        self.draining = True
        await self.update()
