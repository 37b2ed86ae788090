"""Example pass plugin, loaded with `poprt-lite --plugin tests/plugins/scale_outputs.py`.

Shows both forms of the plugin API: a `Pass` subclass with typed Options (set from the command line
with `--pass_option scale_outputs.scale=0.5`), and a decorated function.
"""

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from poprt_lite.passes import Pass, PassContext, PassResult, register_pass


@register_pass("scale_outputs")
class ScaleOutputs(Pass):
    """Multiply every float graph output by a constant (e.g. a softmax temperature on logits)."""

    @dataclass
    class Options:
        scale: float = 1.0

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        scaled = 0
        for index, output in enumerate(graph.outputs):
            if output.dtype != np.float32 or self.options.scale == 1.0:
                continue
            inner = gs.Variable(f"{output.name}_unscaled", dtype=output.dtype, shape=output.shape)
            producer = output.inputs[0]
            producer.outputs[producer.outputs.index(output)] = inner
            factor = gs.Constant(f"{output.name}_scale", np.array(self.options.scale, dtype=np.float32))
            graph.nodes.append(gs.Node("Mul", inputs=[inner, factor], outputs=[output]))
            scaled += 1
        return PassResult(changed=scaled > 0, message=f"{scaled} outputs scaled by {self.options.scale}")


@register_pass("count_matmuls")
def count_matmuls(graph: gs.Graph, ctx: PassContext) -> bool:
    """Record the number of MatMul nodes in the model metadata (poprt_lite.matmuls)."""
    ctx.metadata["matmuls"] = str(sum(node.op == "MatMul" for node in graph.nodes))
    return False
