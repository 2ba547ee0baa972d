"""TokenizeService: the served model's tokenizer, as vLLM's /tokenize and /detokenize."""

from __future__ import annotations

from typing import Any

import grpc

from lateserve.server.domain import InvalidArgument
from lateserve.server.rpc import rpc_method
from lateserve.server.services.convert import ServedModel, chat_from_proto
from lateserve.v1 import tokenize_service_pb2 as pb
from lateserve.v1 import tokenize_service_pb2_grpc as pb_grpc


class TokenizeServicer(pb_grpc.TokenizeServiceServicer):
    def __init__(self, model: ServedModel) -> None:
        self.model = model

    @rpc_method
    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TokenizeResponse:
        self.model.check(request.model)
        engine = self.model.engine
        processor = engine.processor
        if request.messages:
            generation = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
            chat = chat_from_proto(request.messages, request.chat, generation_default=generation)
            prompt = (await engine.prepare(processor.render, chat)).text
            special = request.add_special_tokens if request.HasField("add_special_tokens") else False
        else:
            if request.HasField("chat"):
                raise InvalidArgument("chat options apply to messages only", field="chat")
            prompt = request.prompt
            special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = await engine.prepare(processor.tokenize, prompt, special)
        return pb.TokenizeResponse(
            count=len(ids),
            max_model_len=self.model.engine.spec.max_model_len,
            tokens=ids,
            token_strs=processor.token_strings(ids) if request.return_token_strs else [],
        )

    @rpc_method
    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DetokenizeResponse:
        self.model.check(request.model)
        return pb.DetokenizeResponse(prompt=self.model.engine.processor.detokenize(list(request.tokens)))
