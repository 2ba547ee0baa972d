// The TypeScript client generated from proto/lateserve/v1 (clients/typescript, built by
// `make clients-ts`) against a live server: LATESERVE_GRPC_ADDRESS=host:port node --test tests/node
// tests/integration/test_node_client.py starts the server and runs this file.
import assert from "node:assert/strict";
import { before, describe, test } from "node:test";

import {
  Dtype,
  EmbeddingMode,
  ModelKind,
  PoolingTask,
  createLateserveClient,
  decodeTensor,
  float16ToNumber,
  joinStreamPool,
  rows,
} from "../../clients/typescript/dist/index.js";

const address = process.env.LATESERVE_GRPC_ADDRESS;
const expectedModel = process.env.LATESERVE_EXPECT_MODEL;
const text = (s) => ({ kind: { case: "text", value: s } });

function norm(row) {
  let sum = 0;
  for (const v of row) sum += v * v;
  return Math.sqrt(sum);
}

describe("tensor decoding", () => {
  test("float32, float16 and bfloat16 little-endian bytes", () => {
    const f32 = new Uint8Array(new Float32Array([1.5, -2, 0.25, 3]).buffer);
    const t32 = decodeTensor({ dtype: Dtype.FLOAT32, shape: [2n, 2n], data: f32 });
    assert.deepEqual(t32.shape, [2, 2]);
    assert.deepEqual(Array.from(t32.values), [1.5, -2, 0.25, 3]);
    // 1.5 = 0x3e00, -2 = 0xc000 in binary16; little-endian byte order.
    const t16 = decodeTensor({ dtype: Dtype.FLOAT16, shape: [2n], data: new Uint8Array([0x00, 0x3e, 0x00, 0xc0]) });
    assert.deepEqual(Array.from(t16.values), [1.5, -2]);
    assert.equal(float16ToNumber(0x0001), 2 ** -24);
    assert.equal(float16ToNumber(0x7c00), Infinity);
    // bfloat16: the upper half of float32 1.5 (0x3fc00000) and -2 (0xc0000000).
    const tb = decodeTensor({ dtype: Dtype.BFLOAT16, shape: [1n, 2n], data: new Uint8Array([0xc0, 0x3f, 0x00, 0xc0]) });
    assert.deepEqual(Array.from(tb.values), [1.5, -2]);
    assert.deepEqual(rows(tb).map((r) => Array.from(r)), [[1.5, -2]]);
    assert.throws(() => decodeTensor({ dtype: Dtype.FLOAT32, shape: [3n], data: f32 }), /needs 12 bytes, got 16/);
  });
});

describe("live server", { skip: address ? false : "LATESERVE_GRPC_ADDRESS is not set" }, () => {
  let client;
  let model;

  before(async () => {
    client = createLateserveClient(address);
    const info = await client.info.getInfo({}, { timeoutMs: 30_000 });
    model = info.models[0];
  });

  test("Info describes the served model and the limits", async () => {
    const info = await client.info.getInfo({});
    assert.equal(info.models.length, 1);
    assert.ok(info.version.length > 0);
    if (expectedModel) assert.equal(model.id, expectedModel);
    assert.equal(model.kind, ModelKind.LATE_INTERACTION);
    assert.ok(model.tokenDim > 0, "token_dim");
    assert.ok(model.maxModelLen > 0, "max_model_len");
    assert.ok(model.tasks.includes(PoolingTask.TOKEN_EMBED));
    assert.ok(info.limits.maxMessageBytes > 0);
    assert.ok(info.limits.maxQueuedRequests > 0);
  });

  const query = "What is machine learning?";
  const documents = [
    "The weather is sunny today.",
    "What is machine learning?",
    "Machine learning is a subset of artificial intelligence.",
  ];

  test("Rerank sorts by relevance and cuts to top_n", async () => {
    const response = await client.rerank.rerank({
      query: text(query),
      documents: documents.map(text),
      topN: 2,
      requestId: "node-rerank",
    });
    assert.equal(response.id, "score-node-rerank");
    assert.equal(response.model, model.id);
    assert.equal(response.results.length, 2);
    // The query itself as a document: every MaxSim term is cos = 1, the largest score there is.
    assert.equal(response.results[0].index, 1);
    assert.equal(response.results[0].document.kind.value, documents[1]);
    assert.ok(response.results[0].relevanceScore >= response.results[1].relevanceScore);
    assert.ok(response.usage.promptTokens > 0n);
  });

  test("Score pairs one query with every document, matching Rerank", async () => {
    const [scored, ranked] = await Promise.all([
      client.score.score({ queries: [text(query)], documents: documents.map(text) }),
      client.rerank.rerank({ query: text(query), documents: documents.map(text) }),
    ]);
    assert.deepEqual(scored.results.map((r) => r.index), [0, 1, 2]);
    const byIndex = new Map(ranked.results.map((r) => [r.index, r.relevanceScore]));
    for (const r of scored.results) {
      assert.ok(Number.isFinite(r.score));
      assert.ok(Math.abs(r.score - byIndex.get(r.index)) < 1e-4, `pair ${r.index}: ${r.score} vs ${byIndex.get(r.index)}`);
    }
    assert.equal(scored.usage.promptTokens, ranked.usage.promptTokens);
  });

  const inputs = [query, documents[2]];
  const tolerance = { [Dtype.FLOAT32]: 1e-5, [Dtype.FLOAT16]: 2e-3, [Dtype.BFLOAT16]: 1.6e-2 };
  let reference;

  for (const dtype of [Dtype.FLOAT32, Dtype.FLOAT16, Dtype.BFLOAT16]) {
    test(`StreamPool token_embed as ${Dtype[dtype]}: chunks join into normalised [n_tokens, dim] rows`, async () => {
      const request = {
        inputs: inputs.map(text),
        task: PoolingTask.TOKEN_EMBED,
        dtype,
        options: { embeddingMode: EmbeddingMode.RAW },
        maxChunkBytes: 4 * model.tokenDim * 3, // three float32 rows: several chunks per input
      };
      const chunks = [];
      const stream = client.pool.streamPool(request);
      async function* record() {
        for await (const message of stream) {
          assert.equal(message.data.dtype, dtype);
          chunks.push(message);
          yield message;
        }
      }
      const outputs = [];
      for await (const output of joinStreamPool(record())) outputs.push(output);

      assert.deepEqual(outputs.map((o) => o.index), [0, 1]);
      assert.ok(chunks.length > outputs.length, `expected several chunks per input, got ${chunks.length}`);
      let tokens = 0;
      for (const output of outputs) {
        assert.equal(output.shape.length, 2);
        assert.equal(output.shape[1], model.tokenDim);
        assert.ok(output.shape[0] > 1);
        tokens += output.shape[0];
        for (const [i, row] of rows(output).entries()) {
          assert.ok(Math.abs(norm(row) - 1) < tolerance[dtype] * 4, `input ${output.index} row ${i}: |v| = ${norm(row)}`);
        }
      }
      const last = outputs.at(-1).last;
      assert.equal(last.usage.promptTokens, BigInt(tokens));
      assert.ok(last.timings.totalNs > 0n);
      if (dtype === Dtype.FLOAT32) {
        reference = outputs;
      } else {
        assert.ok(reference, "float32 case runs first");
        for (const [k, output] of outputs.entries()) {
          assert.deepEqual(output.shape, reference[k].shape);
          const worst = output.values.reduce((m, v, j) => Math.max(m, Math.abs(v - reference[k].values[j])), 0);
          assert.ok(worst < tolerance[dtype], `${Dtype[dtype]} vs float32: max error ${worst}`);
        }
      }
    });
  }
});
