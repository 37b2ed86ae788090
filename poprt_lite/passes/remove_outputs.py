"""remove_outputs: drop graph outputs and whatever only they needed (PopRT's pass of that name)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from poprt_lite.errors import PoprtError
from poprt_lite.passes.base import Pass, PassContext, PassResult
from poprt_lite.passes.registry import register_pass


@register_pass("remove_outputs")
class RemoveOutputs(Pass):
    """Remove the named graph outputs and the nodes only they needed (--remove_outputs)."""

    @dataclass
    class Options:
        outputs: tuple[str, ...] = ()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        present = [t.name for t in graph.outputs]
        unknown = [name for name in self.options.outputs if name not in present]
        if unknown:
            raise PoprtError(f"remove_outputs names '{unknown[0]}', which is not a model output; outputs are: {', '.join(present)}")
        kept = [t for t in graph.outputs if t.name not in self.options.outputs]
        if not kept:
            raise PoprtError("remove_outputs would remove every output of the model; keep at least one")
        removed = len(graph.outputs) - len(kept)
        graph.outputs = kept
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(changed=removed > 0, message=f"{removed} outputs removed, {before - len(graph.nodes)} nodes with them")
