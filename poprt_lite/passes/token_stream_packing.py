"""token_stream_packing: one dynamic stream of real tokens per batch; attention per request.

For runtimes without static shapes (onnxruntime on a CPU): no `--input_shape`, no row padding. The
host concatenates the requests of a batch into one stream of T real tokens and feeds it as the
model's own `[batch, sequence]` inputs with batch 1 (`[1, T]`; the batch dim is pinned to 1, the
sequence dim stays dynamic). The new input `unpack_info[N]` (int32, N dynamic: the batch's request
count) holds their lengths in stream order. Everything that acts per token runs on the T tokens.
Each attention block is rewritten as pack_unpack_repack does it (the same `_Rewriter`), with rows
that follow the batch: Q, K and V are unpacked to `[N, heads, L, head_dim]` with L the longest
request of this batch (`Unpack(dynamic=1)`), attend under `PaddingMask(dynamic=1)` and are
repacked into the stream. Sequence ops after the encoder (pooling) run on unpacked rows too, so
pooled outputs are per request (`[N, ...]`); per-token outputs stay on the stream (`[1, T, ...]`,
layout `stream`): request i's tokens start at `sum(unpack_info[:i])`.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from poprt_lite import vocab
from poprt_lite.errors import PoprtError, option
from poprt_lite.passes import packing
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.pack_unpack_repack import _Rewriter
from poprt_lite.passes.registry import register_pass
from poprt_lite.patterns.attention import attention_cone
from poprt_lite.patterns.layout import TokenAxes, token_dims
from poprt_lite.runtime import modes
from poprt_lite.vocab import UNPACK_INFO, Dim, Layout, Role

MODE = modes.TOKEN_STREAM.name


@register_pass("token_stream_packing")
class TokenStreamPacking(Pass):
    """One dynamic [1, T] token stream per batch; attention unpacked per request (--pack_args mode=token_stream)."""

    Options = packing.StreamOptions
    mode = MODE

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        setup = packing.prepare(graph, ctx, self.options, self.name)
        tokens, limit = self.options.max_tokens, self.options.segment_max_size
        if tokens < limit:
            raise PoprtError(
                f"{self.name} needs max_tokens >= segment_max_size ({tokens} < {limit}): a batch must hold "
                f"the longest request ({option('pack_args')} max_tokens=N)"
            )
        if any(t.name == UNPACK_INFO for t in graph.inputs):
            raise PoprtError(f"model already has an '{UNPACK_INFO}' input; it is packed already")
        dims = setup.dims
        _check_dynamic(setup.input_ids, dims, self.mode)
        cone = attention_cone(graph, setup.blocks)  # once: it walks the whole graph
        tail = [n for n in graph.nodes if id(n) not in cone]
        rewriter = _StreamRewriter(graph, self.options, setup.input_ids)
        rewriter.mode = self.mode  # its messages name the mode packed
        for block in setup.blocks:
            rewriter.rewrite_block(block)
        packing.account_masks(ctx, setup.blocks, rewriter.softmax_on_rows, rewriter.on_rows)
        layouts = rewriter.rewrite_tail(tail, dims)
        _pin_stream(graph, dims, layouts)
        vocab.set_role(ctx.metadata, UNPACK_INFO, Role.unpack_info)
        packing.record(ctx, self.mode, self.options, layouts)
        return PassResult(changed=True, message=f"{len(setup.blocks)} attention blocks unpacked/repacked per request")


class _StreamRewriter(_Rewriter):
    """Rows follow the batch: one per request, as long as the longest; token outputs stay on the stream."""

    mode = MODE
    dynamic = True

    @property
    def rows(self) -> tuple[str, str]:
        return Dim.requests.value, Dim.longest.value

    def token_output(self, index: int, output: gs.Variable) -> Layout:
        return Layout.stream


def _check_dynamic(input_ids: gs.Variable, dims: TokenAxes, mode: str) -> None:
    batch, seq = dims.dims
    if isinstance(seq, int) or isinstance(batch, int) and batch != 1:
        raise PoprtError(
            f"input '{input_ids.name}' has shape {list(input_ids.shape)}; mode={mode} feeds one stream "
            "of any length as [1, tokens]: convert the model exported with dynamic [batch, sequence] axes, "
            f"without {option('input_shape')}"
        )


def _pin_stream(graph: gs.Graph, dims: TokenAxes, layouts: dict[str, Layout]) -> None:
    """Declare the stream: [1, tokens] inputs and [1, tokens, ...] stream outputs."""
    stream = dict(zip(dims.dims, (1, Dim.tokens.value)))
    for tensor in graph.inputs:
        if tensor.shape is not None and tensor.name != UNPACK_INFO:
            tensor.shape = [stream.get(d, d) for d in tensor.shape]
    for tensor in graph.outputs:
        if layouts.get(tensor.name) is Layout.stream:
            tensor.shape = [1, Dim.tokens.value, *tensor.shape[2:]]
