"""EmbedService: one vector per input, for models with the embed task."""

from __future__ import annotations

from typing import Any

import grpc

from lateserve.server.domain import InvalidArgument, Task
from lateserve.server.rpc import rpc_method
from lateserve.server.services.convert import (
    ServedModel,
    count_tensor_bytes,
    request_id,
    request_inputs,
    timings,
    usage,
    use_activation,
)
from lateserve.v1 import embed_service_pb2 as pb
from lateserve.v1 import embed_service_pb2_grpc as pb_grpc
from lateserve.wire.tensors import to_tensor


class EmbedServicer(pb_grpc.EmbedServiceServicer):
    def __init__(self, model: ServedModel) -> None:
        self.model = model

    @rpc_method
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.EmbedResponse:
        self.model.check(request.model)
        engine = self.model.engine
        engine.check_task(Task.EMBED)
        if request.HasField("dimensions"):
            dims = request.dimensions
            if not engine.spec.matryoshka:
                raise InvalidArgument(
                    f"Model does not support matryoshka representation, changing output dimensions ({dims}) "
                    "will lead to poor results.",
                    field="dimensions",
                )
            if dims < 1:
                raise InvalidArgument(f"dimensions must be positive, got {dims}", field="dimensions")
            if dims > engine.spec.embed_dim:
                raise InvalidArgument(
                    f"dimensions must be at most the model's embedding size ({engine.spec.embed_dim}), got {dims}",
                    field="dimensions",
                )
        normalize = use_activation(request)
        inputs, options = request_inputs(request)
        result = await engine.encode(inputs, frozenset({Task.EMBED}), options, normalize=normalize)
        embeddings = []
        for i, out in enumerate(result.outputs):
            vector = out[Task.EMBED]
            if request.HasField("dimensions"):
                vector = vector[: request.dimensions]
            embeddings.append(pb.Embedding(index=i, data=to_tensor(vector, request.dtype)))
        count_tensor_bytes("Embed", (e.data for e in embeddings))
        return pb.EmbedResponse(
            id=f"embd-{request_id(request.request_id)}",
            model=self.model.name,
            embeddings=embeddings,
            usage=usage(result.prompt_tokens),
            timings=timings(result.timings),
        )
