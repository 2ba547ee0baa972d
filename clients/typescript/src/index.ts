// lateserve.v1 over gRPC from Node: the generated messages and service descriptors (src/gen/, from
// `buf generate` with buf.gen.yaml), one Connect client per service, and the tensor decoding.
import { createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport, type GrpcTransportOptions } from "@connectrpc/connect-node";
import { EmbedService } from "./gen/lateserve/v1/embed_service_pb.js";
import { InfoService } from "./gen/lateserve/v1/info_service_pb.js";
import { PoolService } from "./gen/lateserve/v1/pool_service_pb.js";
import { RerankService } from "./gen/lateserve/v1/rerank_service_pb.js";
import { ScoreService } from "./gen/lateserve/v1/score_service_pb.js";
import { TokenizeService } from "./gen/lateserve/v1/tokenize_service_pb.js";

export * from "./gen/lateserve/v1/common_pb.js";
export * from "./gen/lateserve/v1/embed_service_pb.js";
export * from "./gen/lateserve/v1/info_service_pb.js";
export * from "./gen/lateserve/v1/pool_service_pb.js";
export * from "./gen/lateserve/v1/rerank_service_pb.js";
export * from "./gen/lateserve/v1/score_service_pb.js";
export * from "./gen/lateserve/v1/tokenize_service_pb.js";
export * from "./tensor.js";

/** A client per lateserve.v1 service, all on one HTTP/2 connection. */
export interface LateserveClient {
  rerank: Client<typeof RerankService>;
  score: Client<typeof ScoreService>;
  pool: Client<typeof PoolService>;
  embed: Client<typeof EmbedService>;
  tokenize: Client<typeof TokenizeService>;
  info: Client<typeof InfoService>;
}

/**
 * Clients for a server's gRPC address: "host:port" (plaintext) or a full "http(s)://host:port" URL.
 * Extra transport options (interceptors, TLS via nodeOptions, limits) pass through.
 */
export function createLateserveClient(
  address: string,
  options: Partial<Omit<GrpcTransportOptions, "baseUrl">> = {},
): LateserveClient {
  const baseUrl = /^https?:\/\//.test(address) ? address : `http://${address}`;
  const transport = createGrpcTransport({ ...options, baseUrl });
  return {
    rerank: createClient(RerankService, transport),
    score: createClient(ScoreService, transport),
    pool: createClient(PoolService, transport),
    embed: createClient(EmbedService, transport),
    tokenize: createClient(TokenizeService, transport),
    info: createClient(InfoService, transport),
  };
}
