// Decoding of lateserve.v1.Tensor: little-endian, row-major element bytes plus shape and dtype
// (common.proto). Every dtype is widened to float32, which holds float16 and bfloat16 exactly.
import { Dtype, type Tensor } from "./gen/lateserve/v1/common_pb.js";
import type { StreamPoolResponse } from "./gen/lateserve/v1/pool_service_pb.js";

/** A tensor's values as float32, with its shape. */
export interface DecodedTensor {
  shape: number[];
  values: Float32Array;
}

/** Bytes per element of a dtype; DTYPE_UNSPECIFIED is the server's default for outputs, float32. */
export function elementSize(dtype: Dtype): number {
  switch (dtype) {
    case Dtype.UNSPECIFIED:
    case Dtype.FLOAT32:
      return 4;
    case Dtype.FLOAT16:
    case Dtype.BFLOAT16:
      return 2;
    default:
      throw new Error(`unknown tensor dtype ${String(dtype)}`);
  }
}

/** IEEE 754 binary16 bits to a number (subnormals, infinities and NaN included). */
export function float16ToNumber(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 0x1f) return fraction ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

/** The values of a tensor as float32, checked against its shape. */
export function decodeTensor(tensor: Tensor): DecodedTensor {
  const shape = tensor.shape.map((dim) => Number(dim));
  if (shape.some((dim) => !Number.isSafeInteger(dim) || dim < 0)) {
    throw new Error(`bad tensor shape [${shape.join(", ")}]`);
  }
  const count = shape.reduce((a, b) => a * b, 1);
  const size = elementSize(tensor.dtype);
  const data = tensor.data;
  if (data.byteLength !== count * size) {
    throw new Error(`tensor of shape [${shape.join(", ")}] needs ${count * size} bytes, got ${data.byteLength}`);
  }
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const values = new Float32Array(count);
  if (size === 4) {
    for (let i = 0; i < count; i++) values[i] = view.getFloat32(i * 4, true);
  } else if (tensor.dtype === Dtype.FLOAT16) {
    for (let i = 0; i < count; i++) values[i] = float16ToNumber(view.getUint16(i * 2, true));
  } else {
    // bfloat16 is the upper half of a float32.
    const word = new DataView(new ArrayBuffer(4));
    for (let i = 0; i < count; i++) {
      word.setUint32(0, view.getUint16(i * 2, true) << 16, false);
      values[i] = word.getFloat32(0, false);
    }
  }
  return { shape, values };
}

/** The rows of a decoded tensor: one per leading index for 2-D and up, the whole tensor for 1-D. */
export function rows(tensor: DecodedTensor): Float32Array[] {
  if (tensor.shape.length <= 1) return [tensor.values];
  const width = tensor.values.length / tensor.shape[0]!;
  return Array.from({ length: tensor.shape[0]! }, (_, i) => tensor.values.subarray(i * width, (i + 1) * width));
}

/** One input's whole output, joined from its StreamPool chunks. */
export interface StreamedOutput extends DecodedTensor {
  index: number;
  /** The last message of the stream (usage and timings are set there). */
  last: StreamPoolResponse;
}

/**
 * Joins StreamPool chunks into one output per input, yielded in input order as each completes.
 * Checks that chunks arrive in order (row_offset) and add up to total_rows.
 */
export async function* joinStreamPool(stream: AsyncIterable<StreamPoolResponse>): AsyncGenerator<StreamedOutput> {
  let parts: DecodedTensor[] = [];
  let index = -1;
  let nextRow = 0;
  for await (const message of stream) {
    if (message.index !== index) {
      if (parts.length) throw new Error(`input ${index} ended without last_chunk`);
      index = message.index;
      nextRow = 0;
    }
    if (!message.data) throw new Error(`input ${index}: chunk without data`);
    if (Number(message.rowOffset) !== nextRow) {
      throw new Error(`input ${index}: chunk at row ${message.rowOffset}, expected ${nextRow}`);
    }
    const part = decodeTensor(message.data);
    parts.push(part);
    nextRow += part.shape.length > 1 ? part.shape[0]! : 1;
    if (!message.lastChunk) continue;
    if (nextRow !== Number(message.totalRows)) {
      throw new Error(`input ${index}: ${nextRow} rows received, total_rows says ${message.totalRows}`);
    }
    const first = parts[0]!;
    const shape = first.shape.length > 1 ? [nextRow, ...first.shape.slice(1)] : first.shape;
    const values = new Float32Array(parts.reduce((n, p) => n + p.values.length, 0));
    let at = 0;
    for (const p of parts) {
      values.set(p.values, at);
      at += p.values.length;
    }
    parts = [];
    yield { index, shape, values, last: message };
  }
  if (parts.length) throw new Error(`stream ended inside input ${index}`);
}
