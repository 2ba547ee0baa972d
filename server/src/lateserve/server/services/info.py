"""InfoService: what is served and under which limits."""

from __future__ import annotations

from typing import Any

import grpc

from lateserve.server import __version__
from lateserve.server.domain import ModelKind, Task
from lateserve.server.rpc import rpc_method
from lateserve.server.services.convert import TASK_TO_PROTO
from lateserve.v1 import common_pb2
from lateserve.v1 import info_service_pb2 as pb
from lateserve.v1 import info_service_pb2_grpc as pb_grpc

KINDS = {
    ModelKind.LATE_INTERACTION: common_pb2.MODEL_KIND_LATE_INTERACTION,
    ModelKind.BI_ENCODER: common_pb2.MODEL_KIND_BI_ENCODER,
    ModelKind.CROSS_ENCODER: common_pb2.MODEL_KIND_CROSS_ENCODER,
}


class InfoServicer(pb_grpc.InfoServiceServicer):
    def __init__(self, info: pb.GetInfoResponse) -> None:
        self.info = info

    @rpc_method
    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetInfoResponse:
        return self.info


def build_info(
    *,
    name: str,
    source: str,
    spec: Any,
    dtype: str,
    device: str,
    workers: int,
    limits: pb.Limits,
) -> pb.GetInfoResponse:
    model = pb.ModelInfo(
        id=name,
        source=source,
        architecture=spec.architecture,
        kind=KINDS[spec.kind],
        token_dim=spec.token_dim,
        embed_dim=spec.embed_dim,
        max_model_len=spec.max_model_len,
        tasks=[TASK_TO_PROTO[t] for t in Task if t in spec.tasks],
        score_modes=list(spec.score_modes),
        dtype=dtype,
        device=device,
        workers=workers,
    )
    return pb.GetInfoResponse(models=[model], version=__version__, limits=limits)
