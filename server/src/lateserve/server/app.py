"""Builds and runs the server: model source -> family -> worker pool -> engine -> gRPC services
(+ health, reflection) -> optional in-process gateway. Start order and the drain order on stop
live here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection

from lateserve.server import metrics, tracing
from lateserve.server.config import (
    DEFAULT_SERVED_NAME,
    ServerConfig,
    checkpoint_bytes,
    default_model_path,
    dtype_reason,
    resolve_device,
    resolve_dtype,
    usable_cores,
    worker_layout,
)
from lateserve.server.domain import ModelKind, ModelLoadError, ModelSpec, Task
from lateserve.server.engine.engine import Engine
from lateserve.server.families.registry import family_for, load_source
from lateserve.server.health import ALL_SERVICES, HealthState
from lateserve.server.rpc import ApiKeyAuth, DecodeErrors
from lateserve.server.scheduler.batcher import Batcher, Ticket
from lateserve.server.scheduler.queue import BatchQueue
from lateserve.server.services.convert import LimitedServicer, MemoryTrimmer, RequestLimits, ServedModel
from lateserve.server.services.embed import EmbedServicer
from lateserve.server.services.info import InfoServicer, build_info
from lateserve.server.services.pool import PoolServicer
from lateserve.server.services.rerank import RerankServicer
from lateserve.server.services.score import ScoreServicer
from lateserve.server.services.tokenize import TokenizeServicer
from lateserve.server.workers.messages import WorkerSpec
from lateserve.server.workers.pool import WorkerPool
from lateserve.v1 import (
    embed_service_pb2_grpc,
    info_service_pb2,
    info_service_pb2_grpc,
    pool_service_pb2_grpc,
    rerank_service_pb2_grpc,
    score_service_pb2_grpc,
    tokenize_service_pb2_grpc,
)

log = logging.getLogger(__name__)


class Server:
    """One served model behind gRPC (and the gateway, unless disabled)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.grpc_port = 0
        self.http_port = 0
        self.pool: WorkerPool | None = None
        self.engine: Engine | None = None
        self._grpc: grpc.aio.Server | None = None
        self._gateway: Any = None
        self._metrics_http: Any = None
        self.metrics_port = 0
        self._batcher: Batcher | None = None
        self._health: HealthState | None = None
        self._health_tasks: set[asyncio.Task[None]] = set()
        self._servicers: dict[str, Any] = {}

    async def start(self) -> None:
        cfg = self.config
        cfg.check_ports()
        cfg.check_tls()
        # First, so a taken port fails in milliseconds and scrapes see the load (workers_ready 0).
        if cfg.metrics_port:
            await self._start_metrics()
        try:
            if cfg.otlp_traces_endpoint:
                tracing.setup(cfg.otlp_traces_endpoint)
                log.info("exporting traces to %s", cfg.otlp_traces_endpoint)
            await self._start_serving()
        except BaseException:
            await self._stop_metrics()
            raise
        log.info(
            "ready: gRPC on port %d%s%s",
            self.grpc_port,
            f", HTTP on port {self.http_port}" if cfg.gateway else "",
            f", /metrics on port {self.metrics_port}" if self._metrics_http is not None else "",
        )

    async def _start_serving(self) -> None:
        cfg = self.config
        model = cfg.model or default_model_path()
        name = cfg.served_model_name or cfg.model or DEFAULT_SERVED_NAME
        source = load_source(
            model,
            hf_overrides=cfg.hf_overrides,
            trust_remote_code=cfg.trust_remote_code,
            max_model_len=cfg.max_model_len,
            chat_template=cfg.chat_template,
            media=cfg.media,
            mm_processor_kwargs=cfg.mm_processor_kwargs,
        )
        family = family_for(source)
        spec = family.spec()
        # The bundled all-MiniLM-L6-v2 (a sentence-transformers bi-encoder) is served as late interaction.
        bundled = not cfg.model or source.path == Path(default_model_path()).resolve()
        spec = self._with_score_type(spec, cfg.score_type or (ModelKind.LATE_INTERACTION.value if bundled else ""))
        processor = family.processor()
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        n_workers, threads = worker_layout(
            device, cfg.workers, cfg.threads_per_worker, weight_bytes=checkpoint_bytes(source.path)
        )
        log.info(
            "serving %s (%s, %s) as %r: %d worker(s) x %d thread(s) on %s, dtype %s (%s), max_model_len %d",
            source.name, spec.architecture, spec.kind.value, name, n_workers, threads, device, dtype,
            dtype_reason(cfg.dtype, device), spec.max_model_len,
        )  # fmt: skip
        self.pool = WorkerPool(
            [
                WorkerSpec(
                    model=str(source.path),
                    hf_overrides=cfg.hf_overrides,
                    trust_remote_code=cfg.trust_remote_code,
                    max_model_len=cfg.max_model_len,
                    device=device,
                    dtype=dtype,
                    threads=threads,
                    worker_id=i,
                    cuda_device=i if device == "cuda" else None,
                )
                for i in range(n_workers)
            ],
            load_timeout_s=cfg.load_timeout_seconds,
            heartbeat_s=cfg.worker_heartbeat,
        )
        queue: BatchQueue[Ticket] = BatchQueue(max(cfg.max_num_batched_tokens, spec.max_model_len), cfg.max_num_seqs)
        self._batcher = Batcher(
            self.pool,
            queue,
            batch_timeout_s=cfg.worker_batch_timeout,
            lend_cores_min_s=cfg.lend_cores_min_ms / 1000 if cfg.lend_cores_min_ms >= 0 else -1.0,
        )
        self.engine = Engine(
            spec,
            processor,
            self._batcher,
            max_queued_requests=cfg.max_queued_requests,
            max_queued_tokens=cfg.max_queued_tokens,
            max_queued_bytes=cfg.max_queued_bytes,
            max_queue_wait_s=cfg.max_queue_wait_ms / 1000,
            prepare_threads=cfg.prepare_threads or min(4, usable_cores()),
            max_images_per_prompt=cfg.media.max_images_per_prompt,
            doc_cache_bytes=cfg.doc_cache_mb << 20 if spec.kind == ModelKind.LATE_INTERACTION else 0,
            faithful_scoring=cfg.scoring_embedding_mode == "faithful",
        )
        served = ServedModel(name, self.engine)
        limits = info_service_pb2.Limits(
            max_num_batched_tokens=queue.max_batch_tokens,
            max_num_seqs=cfg.max_num_seqs,
            max_queued_requests=cfg.max_queued_requests,
            max_message_bytes=cfg.max_message_bytes,
        )
        info = build_info(
            name=name, source=source.name, spec=spec, dtype=dtype, device=device, workers=n_workers, limits=limits
        )
        self._health = HealthState(spec)
        await self._health.update(0)
        self.pool.add_listener(self._on_pool_change)
        self._grpc = self._build_grpc(served, info)
        self.grpc_port = self._add_port(self._grpc)
        await self._grpc.start()
        self._batcher.start()
        try:
            await self.pool.start()
            if cfg.gateway:
                await self._start_gateway()
        except BaseException:
            await self.stop(0)
            raise

    @staticmethod
    def _with_score_type(spec: ModelSpec, score_type: str) -> ModelSpec:
        """--score-type: the scoring procedure, when the model has the outputs it needs."""
        if not score_type or score_type == spec.kind.value:
            return spec
        kind = ModelKind(score_type)
        needs = {
            ModelKind.LATE_INTERACTION: Task.TOKEN_EMBED,
            ModelKind.BI_ENCODER: Task.EMBED,
            ModelKind.CROSS_ENCODER: Task.CLASSIFY,
        }[kind]
        if needs not in spec.tasks:
            raise ModelLoadError(
                f"--score-type {score_type} needs the {needs.value} task, which {spec.architecture} does not have"
            )
        return replace(spec, kind=kind)

    def grpc_options(self) -> list[tuple[str, int]]:
        """Message limits and the connection timeouts (keepalive, idle, age) of the gRPC server."""
        cfg = self.config

        def ms(seconds: float) -> int:
            return int(seconds * 1000) if seconds > 0 else 2**31 - 1  # 0: never (INT_MAX is grpc's "infinite")

        return [
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.keepalive_time_ms", ms(cfg.grpc_keepalive_time)),
            ("grpc.keepalive_timeout_ms", ms(cfg.grpc_keepalive_timeout)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_connection_idle_ms", ms(cfg.grpc_max_connection_idle)),
            ("grpc.max_connection_age_ms", ms(cfg.grpc_max_connection_age)),
            ("grpc.max_connection_age_grace_ms", ms(cfg.grpc_max_connection_age_grace)),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(cfg.grpc_min_ping_interval)),
            ("grpc.http2.max_ping_strikes", 2),
            # A connection that never completes the HTTP/2 handshake: the HTTP header timeout applies.
            ("grpc.server_handshake_timeout_ms", ms(cfg.http_header_timeout)),
        ]

    def _add_port(self, server: grpc.aio.Server) -> int:
        """The gRPC port: TLS with --grpc-ssl-certfile/-keyfile (mutual TLS with --grpc-ssl-ca-certfile),
        plaintext otherwise."""
        cfg = self.config
        address = f"{cfg.grpc_host}:{cfg.grpc_port}"
        if not cfg.grpc_ssl_certfile:
            return server.add_insecure_port(address)
        assert cfg.grpc_ssl_keyfile is not None
        ca = Path(cfg.grpc_ssl_ca_certfile).read_bytes() if cfg.grpc_ssl_ca_certfile else None
        credentials = grpc.ssl_server_credentials(
            [(Path(cfg.grpc_ssl_keyfile).read_bytes(), Path(cfg.grpc_ssl_certfile).read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )
        return server.add_secure_port(address, credentials)

    def _build_grpc(self, served: ServedModel, info: info_service_pb2.GetInfoResponse) -> grpc.aio.Server:
        cfg = self.config
        # The key check comes first, before the request bytes are even decoded.
        interceptors: list[grpc.aio.ServerInterceptor] = [ApiKeyAuth(cfg.api_key)] if cfg.api_key else []
        interceptors.append(DecodeErrors())
        server = grpc.aio.server(interceptors=interceptors, options=self.grpc_options())
        assert self._health is not None
        limits = RequestLimits(
            max_input_chars=cfg.max_input_chars,
            max_request_chars=cfg.max_request_chars,
            max_items_per_request=cfg.max_items_per_request,
            max_request_id_chars=cfg.max_request_id_chars,
        )
        trimmer = MemoryTrimmer()

        def limited(servicer: Any) -> Any:
            return LimitedServicer(servicer, limits, trimmer)

        s = self._servicers = {
            "rerank": limited(RerankServicer(served)),
            "score": limited(ScoreServicer(served)),
            "pool": limited(PoolServicer(served)),
            "embed": limited(EmbedServicer(served)),
            "tokenize": limited(TokenizeServicer(served)),
            "info": InfoServicer(info),
            "health": self._health.servicer,
        }
        rerank_service_pb2_grpc.add_RerankServiceServicer_to_server(s["rerank"], server)
        score_service_pb2_grpc.add_ScoreServiceServicer_to_server(s["score"], server)
        pool_service_pb2_grpc.add_PoolServiceServicer_to_server(s["pool"], server)
        embed_service_pb2_grpc.add_EmbedServiceServicer_to_server(s["embed"], server)
        tokenize_service_pb2_grpc.add_TokenizeServiceServicer_to_server(s["tokenize"], server)
        info_service_pb2_grpc.add_InfoServiceServicer_to_server(s["info"], server)
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(s["health"], server)
        reflection.enable_server_reflection((*ALL_SERVICES, "grpc.health.v1.Health", reflection.SERVICE_NAME), server)
        return server

    async def _start_gateway(self) -> None:
        from lateserve.gateway.app import start_gateway
        from lateserve.gateway.config import GatewayConfig
        from lateserve.server.inprocess import direct_stubs

        cfg = self.config
        self._gateway = await start_gateway(
            GatewayConfig(
                grpc_target=f"127.0.0.1:{self.grpc_port}",
                host=cfg.host,
                port=cfg.port,
                max_body_bytes=cfg.max_body_bytes,
                grpc_max_message_bytes=cfg.max_message_bytes,
                max_input_chars=cfg.max_input_chars,
                max_request_chars=cfg.max_request_chars,
                max_items_per_request=cfg.max_items_per_request,
                max_request_id_chars=cfg.max_request_id_chars,
                header_timeout_s=cfg.http_header_timeout,
                body_timeout_s=cfg.http_body_timeout,
                keepalive_timeout_s=cfg.http_keepalive_timeout,
                # In process the gateway calls the servicers directly (no interceptor), so it checks the
                # key itself on every HTTP request: once, and never bypassed.
                api_key=cfg.api_key,
                ssl_certfile=cfg.ssl_certfile,
                ssl_keyfile=cfg.ssl_keyfile,
            ),
            stubs=direct_stubs(**self._servicers),
        )
        addresses = getattr(self._gateway, "addresses", [])
        self.http_port = int(addresses[0][1]) if addresses else cfg.port

    async def _start_metrics(self) -> None:
        from lateserve.server.metrics_http import start_metrics_server

        cfg = self.config
        self._metrics_http, self.metrics_port = await start_metrics_server(cfg.host, cfg.metrics_port, self._render)

    def _render(self) -> bytes:
        """What GET /metrics answers on --metrics-port: with the in-process gateway, exactly its /metrics
        (its HTTP series, then the default registry), so moving a scrape between the two ports loses no
        series; without it, the default registry, where every lateserve_* server series lives."""
        if self._gateway is not None:
            from lateserve.gateway.keys import METRICS

            body, _ = self._gateway.app[METRICS].render()
            return bytes(body)
        from lateserve.server.metrics_http import default_render

        return default_render()

    async def _stop_metrics(self) -> None:
        runner, self._metrics_http = self._metrics_http, None
        if runner is not None:
            await runner.cleanup()

    def _on_pool_change(self, ready: int) -> None:
        metrics.WORKERS_READY.set(ready)
        if self._health is not None:
            task = asyncio.get_running_loop().create_task(self._health.update(ready))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new work, let in-flight requests finish, stop workers."""
        grace = self.config.shutdown_grace_seconds if grace_s is None else grace_s
        if self._health is not None:
            await self._health.drain()
        if self.engine is not None:
            self.engine.accepting = False
        if self._gateway is not None:
            await self._gateway.cleanup()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._batcher is not None:
            await self._batcher.stop()
        if self.pool is not None:
            await self.pool.stop()
        if self.engine is not None:
            self.engine.close()
        if self.config.otlp_traces_endpoint:
            tracing.shutdown()
        # Last: Prometheus sees the queue drain and the workers go.
        await self._stop_metrics()
