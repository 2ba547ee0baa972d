"""CPU fast paths for encoder forwards: oneDNN prepacked linears, unpadded tokens, bf16 matmuls.

Why (measured on the project's 2-core AVX-512/avx512_bf16 machine, docs/benchmarks.md): oneDNN with
weights prepacked once runs the model's float32 GEMMs at ~200 GFLOP/s against 134-186 for torch's default
(MKL), bfloat16 GEMMs at ~420, and a 1x20 rerank batch padded to one length carries 46 % padding.

`optimize_for_cpu(module, dtype)` returns a module to call instead of `module`:

- a transformers `BertModel` (encoder, absolute positions) becomes `FastBertModel`: the same call
  (`input_ids`, `attention_mask`, `token_type_ids`) and `.last_hidden_state`, computed over the real
  tokens only (rows packed, no padding through the linears), with fused projections and GELU-fused oneDNN
  linears. Attention runs per sequence on the packed rows; batches of many short sequences, or with
  masked positions inside a sequence, use one padded SDPA call masked exactly as transformers masks.
- anything else has its `nn.Linear` layers swapped for `PackedLinear` (oneDNN, prepacked).

Numerics: float32 stays float32 everywhere (differences to transformers come from summation order
only, ~1e-6 on normalised token vectors). bfloat16 runs every matmul but the attention *key*
projection on bf16 weights and inputs (83 % of the FLOPs), accumulating in float32 inside oneDNN;
embeddings, the key projection, residual adds, LayerNorm, softmax/attention, the projection head and
normalisation stay float32. Why the key: a rounding error in a key moves the logits of every query
that attends to it. One matmul at a time in bf16 on all-MiniLM-L6-v2, the key projection alone takes
the worst token of a longer text set to 0.99993 (query, value, output: 0.99998-0.99999), and with it
in bf16 too the worst token of the benchmark request falls below the 0.9999 cosine bar (0.99989). This
policy: 0.99995 on that request, the same worst token on the longer set as the earlier
feed-forward-only policy (0.99988 vs 0.99989), 15 % faster (docs/benchmarks.md section 5).
`BF16_MATMULS` names the policy; `FastBertModel(..., bf16_matmuls=...)` takes another for
experiments (bench/bench_forward.py).
float16 has no fast path here: the module is cast as before.
"""

from __future__ import annotations

import itertools
import logging
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# Which BERT matmuls run in bf16 when the compute dtype is bfloat16: the query, value and output
# projections of attention, and the feed-forward ("ffn", up and down). The key projection stays float32.
BF16_MATMULS = frozenset({"query", "value", "output", "ffn"})


def onednn_available() -> bool:
    """oneDNN (mkldnn) linear kernels are present in this torch build."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`nn.Linear` through oneDNN with the weight reordered once at load ("prepacked").

    `compute_dtype` bfloat16 runs the matmul on bf16 inputs and weights (float32 accumulation inside
    oneDNN); float32 is exact float32 (another summation order than MKL, ~1e-6). The result is float32
    unless `float_output` is False (then it stays in `compute_dtype`, for a following PackedLinear).
    `activation` "gelu" (erf) or "gelu_tanh" is fused into the kernel's epilogue.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype = torch.float32,
        activation: str = "",
        *,
        float_output: bool = True,
    ) -> None:
        super().__init__()
        weight = weight.detach().to(compute_dtype).contiguous()
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.compute_dtype = compute_dtype
        self.float_output = float_output
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self._bias = None if bias is None else bias.detach().to(compute_dtype).contiguous()
        if activation in ("gelu", "gelu_tanh"):
            self._attr, self._algorithm = "gelu", "none" if activation == "gelu" else "tanh"
        elif activation:
            raise ValueError(f"unsupported fused activation {activation!r}")
        else:
            self._attr, self._algorithm = "none", ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self._packed, self._bias, self._attr, [], self._algorithm
        )
        return y.float() if self.float_output and y.dtype != torch.float32 else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.compute_dtype}, act={self._attr}"


def swap_linears(
    module: nn.Module, compute_dtype: torch.dtype = torch.float32, *, float_output: bool = True
) -> nn.Module:
    """Replace every `nn.Linear` under `module` (in place) with a `PackedLinear`; returns `module`."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias, compute_dtype, float_output=float_output))
        else:
            swap_linears(child, compute_dtype, float_output=float_output)
    return module


class PatchConvAsLinear(nn.Module):
    """A convolution whose kernel equals its stride, fed inputs already cut one patch per row (Qwen-VL's
    patch embedding receives `[patches, C * T * P * P]` and views it back into 3D patches for a Conv3d):
    the same numbers as one GEMM over the flattened patches, run as a prepacked oneDNN linear.

    Why: a 1200-patch page's Conv3d takes ~114 ms in float32 on one thread against ~16 ms as this GEMM
    (bfloat16: ~43 against ~7 ms); results equal up to summation order (max abs 6e-6 in float32)."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, dtype: torch.dtype) -> None:
        super().__init__()
        padding = conv.padding
        unpadded = padding == "valid" or (not isinstance(padding, str) and not any(padding))
        if tuple(conv.kernel_size) != tuple(conv.stride) or conv.groups != 1 or not unpadded:
            raise ValueError("only a non-overlapping, unpadded, ungrouped patch convolution is one GEMM")
        weight = conv.weight.detach().reshape(conv.out_channels, -1)
        self.in_features = int(weight.shape[1])
        self.out_features = conv.out_channels
        self.linear = PackedLinear(weight, conv.bias, dtype, float_output=dtype == torch.float32)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.linear(patches.reshape(-1, self.in_features))
        return y


def pack_linears_in_place(module: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """Prepacked oneDNN linears for a module that already runs in `dtype` on `device` (the vision-language
    backbones, whose forward stays transformers' own): every `nn.Linear` becomes a `PackedLinear` that
    takes and returns `dtype`, so nothing around it changes. True when it applied (CPU, float32 or bfloat16,
    oneDNN present).

    Why: on the Qwen3-VL benchmark model (Qwen3-VL-2B widths, one 1275x1650 page, one thread) the forward
    takes 1.09 s instead of 2.02 s in float32 and 0.58 s instead of 0.65 s in bfloat16; worst token cosine
    to the unpacked float32 forward 0.9999999 (summation order), bfloat16 identical (docs/benchmarks.md).
    """
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not onednn_available():
        return False
    swap_linears(module, dtype, float_output=dtype == torch.float32)
    log.info("CPU fast path: oneDNN prepacked linears, %s", dtype)
    return True


def _layer_norm(x: torch.Tensor, ln: Any) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class _Layer(nn.Module):
    """One BERT layer's weights, ready for the packed forward (LayerNorms kept in float32).

    Query, key and value projections that share a dtype are fused into one GEMM (`qkv_groups`: the
    projection names each GEMM produces, in order).
    """

    def __init__(self, layer: Any, compute: torch.dtype, gelu: str, bf16: frozenset[str]) -> None:
        super().__init__()
        attn = layer.attention.self

        def dtype_of(name: str) -> torch.dtype:
            return compute if name in bf16 else torch.float32

        groups: dict[torch.dtype, list[str]] = {}
        for name in ("query", "key", "value"):
            groups.setdefault(dtype_of(name), []).append(name)
        self.qkv_groups = [tuple(names) for names in groups.values()]
        self.qkv = nn.ModuleList(
            PackedLinear(
                torch.cat([getattr(attn, n).weight for n in names]),
                torch.cat([getattr(attn, n).bias for n in names]),
                dtype,
            )
            for dtype, names in groups.items()
        )
        out = layer.attention.output.dense
        self.attn_out = PackedLinear(out.weight, out.bias, dtype_of("output"))
        self.ln1 = layer.attention.output.LayerNorm.float()
        dense = layer.intermediate.dense
        ffn = dtype_of("ffn")
        self.up = PackedLinear(dense.weight, dense.bias, ffn, gelu, float_output=False)
        self.down = PackedLinear(layer.output.dense.weight, layer.output.dense.bias, ffn)
        self.ln2 = layer.output.LayerNorm.float()

    def project(self, x: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
        """(query, key, value), each [tokens, heads, head_dim] float32 (views into the GEMM outputs)."""
        parts: dict[str, torch.Tensor] = {}
        for names, linear in zip(self.qkv_groups, self.qkv, strict=True):
            y = linear(x).view(x.shape[0], len(names), heads, head_dim)
            parts.update(zip(names, y.unbind(1), strict=True))
        return parts["query"], parts["key"], parts["value"]


class FastBertModel(nn.Module):
    """A drop-in, inference-only `BertModel` replacement for CPU (see the module docstring)."""

    # Attention runs sequence by sequence on the packed rows (no padding, no mask) unless the batch
    # has many short sequences: more than `varlen_max_batch` of them averaging under
    # `varlen_min_mean_tokens`; then one padded, masked SDPA call costs less than the Python loop.
    varlen_max_batch = 64
    varlen_min_mean_tokens = 32

    def __init__(self, bert: Any, compute_dtype: torch.dtype, *, bf16_matmuls: frozenset[str] = BF16_MATMULS) -> None:
        super().__init__()
        config = bert.config
        emb = bert.embeddings
        self.config = config
        self.compute_dtype = compute_dtype
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        self.hidden = int(config.hidden_size)
        self.scale = self.head_dim**-0.5
        self.word = emb.word_embeddings.weight.detach().float()
        self.position = emb.position_embeddings.weight.detach().float()
        self.token_type = emb.token_type_embeddings.weight.detach().float()
        self.ln0 = emb.LayerNorm.float()
        gelu = "gelu" if _GELU[config.hidden_act] == "none" else "gelu_tanh"
        self._layer_list = [_Layer(layer, compute_dtype, gelu, bf16_matmuls) for layer in bert.encoder.layer]
        self.layers = nn.ModuleList(self._layer_list)
        self.pad_id = int(config.pad_token_id or 0)

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """A transformers BertModel this class reproduces exactly (no decoder, cache or cross-attention)."""
        config = getattr(module, "config", None)
        return (
            type(module).__name__ == "BertModel"
            and config is not None
            and not getattr(config, "is_decoder", False)
            and not getattr(config, "add_cross_attention", False)
            and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and isinstance(getattr(config, "hidden_act", None), str)
            and config.hidden_act in _GELU
            and hasattr(module, "embeddings")
            and hasattr(module, "encoder")
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> SimpleNamespace:
        """[batch, width] ids -> `.last_hidden_state` [batch, width, hidden] float32.

        Rows past a sequence's end (trailing positions with mask 0 holding the pad id) are not
        computed and come back as zeros; every other position is computed as transformers does,
        attending to the keys whose mask is 1 (so masked query-expansion tokens still get vectors).
        """
        batch, width = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        real = (mask != 0) | (input_ids != self.pad_id)
        positions = torch.arange(width, device=input_ids.device)
        ends = torch.where(real, positions + 1, 0).amax(dim=1)  # each row's computed prefix
        valid = positions.unsqueeze(0) < ends.unsqueeze(1)
        full = bool(valid.all())
        flat = valid.reshape(-1).nonzero().squeeze(1)  # row-major positions of computed tokens
        ids = input_ids.reshape(-1)
        pos = positions.repeat(batch)
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids.reshape(-1)
        if not full:
            ids, pos, types = ids.index_select(0, flat), pos.index_select(0, flat), types.index_select(0, flat)
        x = self.word.index_select(0, ids) + self.token_type.index_select(0, types)
        x = _layer_norm(x + self.position.index_select(0, pos), self.ln0)
        keys = mask != 0
        unmasked = bool(keys[valid].all())  # no masked key inside any computed prefix
        spans: list[tuple[int, int]] | None = None
        key_mask: torch.Tensor | None = None
        tokens = int(flat.numel())
        if unmasked and (batch <= self.varlen_max_batch or tokens >= self.varlen_min_mean_tokens * batch):
            starts = [0, *itertools.accumulate(ends.tolist())]
            spans = [(a, b) for a, b in itertools.pairwise(starts) if b > a]
        elif not unmasked or not full:
            key_mask = keys.view(batch, 1, 1, width)
        for layer in self._layer_list:
            x = self._layer(layer, x, spans, flat, batch, width, key_mask, full)
        out = x if full else x.new_zeros(batch * width, self.hidden).index_copy_(0, flat, x)
        return SimpleNamespace(last_hidden_state=out.view(batch, width, self.hidden))

    def _attention_varlen(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Attention sequence by sequence over packed rows: [tokens, heads, head_dim] each -> [tokens, hidden]."""
        tokens = q.shape[0]
        out = q.new_empty(tokens, self.heads, self.head_dim)
        for a, b in spans:
            scores = torch.matmul(q[a:b].transpose(0, 1), k[a:b].permute(1, 2, 0)).mul_(self.scale)
            out[a:b] = torch.matmul(scores.softmax(dim=-1), v[a:b].transpose(0, 1)).transpose(0, 1)
        return out.view(tokens, self.hidden)

    def _attention_padded(
        self,
        qkv: tuple[torch.Tensor, ...],
        flat: torch.Tensor,
        batch: int,
        width: int,
        key_mask: torch.Tensor | None,
        full: bool,
    ) -> torch.Tensor:
        packed = torch.stack(qkv, dim=1).view(-1, 3 * self.hidden)  # [tokens, 3 * hidden]
        if not full:
            packed = packed.new_zeros(batch * width, 3 * self.hidden).index_copy_(0, flat, packed)
        q, k, v = packed.view(batch, width, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [batch, heads, width, head_dim]
        ctx = ctx.transpose(1, 2).reshape(batch * width, self.hidden)
        return ctx if full else ctx.index_select(0, flat)

    def _layer(
        self,
        layer: _Layer,
        x: torch.Tensor,
        spans: list[tuple[int, int]] | None,
        flat: torch.Tensor,
        batch: int,
        width: int,
        key_mask: torch.Tensor | None,
        full: bool,
    ) -> torch.Tensor:
        q, k, v = layer.project(x, self.heads, self.head_dim)  # float32: attention runs in float32
        if spans is not None:
            ctx = self._attention_varlen(q, k, v, spans)
        else:
            ctx = self._attention_padded((q, k, v), flat, batch, width, key_mask, full)
        h = _layer_norm(layer.attn_out(ctx) + x, layer.ln1)
        return _layer_norm(layer.down(layer.up(h)) + h, layer.ln2)


def optimize_for_cpu(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The fastest exact-enough CPU version of `module` for inference in `dtype` (see module doc).

    float32 and bfloat16 get oneDNN linears (and, for BertModel, the unpadded forward); other
    dtypes, or a torch without oneDNN, get `module.to(dtype)` unchanged.
    """
    if dtype not in (torch.float32, torch.bfloat16) or not onednn_available():
        return module.to(dtype)
    module = module.float().eval()
    if FastBertModel.supports(module):
        log.info(
            "CPU fast path: unpadded BERT forward, oneDNN linears, %s",
            "bfloat16 matmuls except the attention key projection" if dtype == torch.bfloat16 else "float32",
        )
        return FastBertModel(module, dtype)
    log.info("CPU fast path: oneDNN linears, %s matmuls", dtype)
    return swap_linears(module, dtype)
