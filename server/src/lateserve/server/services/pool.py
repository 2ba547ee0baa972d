"""PoolService: raw pooled outputs, unary or streamed one input at a time in bounded chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from lateserve.server.domain import InvalidArgument, LexicalSpec, Modality, ModelKind, Task
from lateserve.server.engine.engine import EncodeResult
from lateserve.server.engine.lexical import lexical_weights
from lateserve.server.engine.token_pooling import mask_non_image, pool_tokens
from lateserve.server.rpc import rpc_method, rpc_stream
from lateserve.server.services.convert import (
    TASKS,
    ServedModel,
    count_tensor_bytes,
    request_id,
    request_inputs,
    timings,
    usage,
    use_activation,
)
from lateserve.v1 import pool_service_pb2 as pb
from lateserve.v1 import pool_service_pb2_grpc as pb_grpc
from lateserve.wire.tensors import to_tensor

DEFAULT_CHUNK_BYTES = 1 << 20
PoolLike = pb.PoolRequest | pb.StreamPoolRequest


def token_reduction(request: PoolLike, task: Task, model: ServedModel) -> tuple[int, bool]:
    """(pool_factor, mask_non_image_embeddings), checked before any encoding: both only for token_embed on a
    late-interaction model, the mask only on a model that reads images, pool_factor >= 1."""
    engine = model.engine
    factor = request.pool_factor if request.HasField("pool_factor") else 1
    mask = request.mask_non_image_embeddings
    for name, asked in (("pool_factor", request.HasField("pool_factor")), ("mask_non_image_embeddings", mask)):
        if not asked:
            continue
        if task is not Task.TOKEN_EMBED or engine.spec.kind != ModelKind.LATE_INTERACTION:
            raise InvalidArgument(
                f"{name} applies to task token_embed on a late-interaction model; got task {task.value} on "
                f"{engine.spec.architecture} ({engine.spec.kind.value})",
                field=name,
            )
    if request.HasField("pool_factor") and factor < 1:
        raise InvalidArgument(f"pool_factor must be an integer >= 1 (1: no pooling), got {factor}", field="pool_factor")
    if mask and Modality.IMAGE not in engine.spec.modalities:
        raise InvalidArgument(
            f"mask_non_image_embeddings keeps image tokens; {engine.spec.architecture} takes text only",
            field="mask_non_image_embeddings",
        )
    return factor, mask


def reduce_tokens(result: EncodeResult, task: Task, factor: int, mask: bool, normalize: bool) -> EncodeResult:
    """The image rows of each input (mask), then hierarchical token pooling (factor > 1). CPU work on numpy:
    run it off the event loop."""
    outputs = []
    for out, sequence in zip(result.outputs, result.sequences, strict=True):
        array = out[task]
        if mask:
            array = mask_non_image(array, sequence)
        if factor > 1:
            array = pool_tokens(array, factor, normalize=normalize)
        outputs.append({**out, task: array})
    return EncodeResult(outputs, result.sequences, result.timings)


class PoolServicer(pb_grpc.PoolServiceServicer):
    def __init__(self, model: ServedModel) -> None:
        self.model = model

    def _task(self, request: PoolLike) -> Task:
        if request.task == 0:
            return self.model.engine.spec.default_task
        if request.task not in TASKS:
            raise InvalidArgument(f"unknown task {request.task}", field="task")
        return TASKS[request.task]

    async def _run(self, request: PoolLike) -> tuple[Task, EncodeResult]:
        self.model.check(request.model)
        if request.HasField("dimensions"):
            raise InvalidArgument("dimensions is currently not supported", field="dimensions")  # as vLLM's /pooling
        task = self._task(request)
        inputs, options = request_inputs(request)
        # One switch, as vLLM: L2 normalisation for embed/token_embed, the classifier activation for
        # classify (and BGE-M3's sparse relu, which reads the normalize flag) for the classify tasks.
        activation = use_activation(request)
        if request.return_lexical_weights:
            self._lexical_spec(task)  # fail before encoding
        factor, mask = token_reduction(request, task, self.model)  # fail before encoding
        engine = self.model.engine
        result = await engine.encode(
            inputs, frozenset({task}), options, normalize=activation, activation=activation, field="input"
        )
        if factor > 1 or mask:
            # Clustering is O(n^2) memory and O(n^3) time per document: the prepare pool, not the loop.
            start = time.perf_counter_ns()
            result = await engine.prepare(reduce_tokens, result, task, factor, mask, activation)
            result.timings.total_ns += time.perf_counter_ns() - start
        return task, result

    def _lexical_spec(self, task: Task) -> LexicalSpec:
        """return_lexical_weights needs token_classify on a model with a sparse head."""
        engine = self.model.engine
        engine.check_task(task)  # token_classify unsupported: UNSUPPORTED_TASK, as without the flag
        spec = engine.spec.lexical
        if task is not Task.TOKEN_CLASSIFY or not isinstance(spec, LexicalSpec):
            why = f"not {task.value}" if task is not Task.TOKEN_CLASSIFY else f"{engine.spec.architecture} has none"
            raise InvalidArgument(
                f"return_lexical_weights needs task token_classify on a model with a sparse head ({why})",
                field="return_lexical_weights",
            )
        return spec

    def _lexical(self, request: PoolLike, task: Task, result: EncodeResult, index: int) -> list[pb.LexicalWeight]:
        """FlagEmbedding-style lexical weights of one input, when asked for."""
        if not request.return_lexical_weights:
            return []
        weights = lexical_weights(result.sequences[index].ids, result.outputs[index][task], self._lexical_spec(task))
        tokens = self.model.engine.processor.token_strings([token_id for token_id, _ in weights])
        return [
            pb.LexicalWeight(token_id=token_id, token=token, weight=weight)
            for (token_id, weight), token in zip(weights, tokens, strict=True)
        ]

    @rpc_method
    async def Pool(self, request: pb.PoolRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.PoolResponse:
        task, result = await self._run(request)
        outputs = [
            pb.PoolOutput(
                index=i,
                data=to_tensor(out[task], request.dtype),
                lexical_weights=self._lexical(request, task, result, i),
            )
            for i, out in enumerate(result.outputs)
        ]
        count_tensor_bytes("Pool", (o.data for o in outputs))
        return pb.PoolResponse(
            id=f"pooling-{request_id(request.request_id)}",
            model=self.model.name,
            outputs=outputs,
            usage=usage(result.prompt_tokens),
            timings=timings(result.timings),
        )

    @rpc_stream
    async def StreamPool(
        self, request: pb.StreamPoolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamPoolResponse]:
        task, result = await self._run(request)
        limit = request.max_chunk_bytes if request.HasField("max_chunk_bytes") and request.max_chunk_bytes > 0 else 0
        limit = limit or DEFAULT_CHUNK_BYTES
        last_index = len(result.outputs) - 1
        for index, out in enumerate(result.outputs):
            array = out[task]
            rows = array.shape[0] if array.ndim > 1 else 1
            row_bytes = max(1, array.nbytes // max(rows, 1))
            step = max(1, limit // row_bytes) if array.ndim > 1 else 1
            for offset in range(0, rows, step):
                chunk = array[offset : offset + step] if array.ndim > 1 else array
                last_chunk = offset + step >= rows
                message = pb.StreamPoolResponse(
                    index=index,
                    data=to_tensor(chunk, request.dtype),
                    row_offset=offset,
                    total_rows=rows,
                    last_chunk=last_chunk,
                )
                if last_chunk:
                    message.lexical_weights.extend(self._lexical(request, task, result, index))
                count_tensor_bytes("StreamPool", (message.data,))
                if last_chunk and index == last_index:
                    message.usage.CopyFrom(usage(result.prompt_tokens))
                    message.timings.CopyFrom(timings(result.timings))
                yield message
