# A pass written as PopRT's packed DeBERTa example writes its pass: `__call__` on the ModelProto,
# `from poprt import Pass` (here `from poprt_lite import Pass`), registered with `register`.
import onnx

from poprt_lite import Pass
from poprt_lite.passes import register


@register('rename_outputs_upper')
class RenameOutputsUpper(Pass):
    """Rename every graph output to upper case."""

    def __call__(self, model: onnx.ModelProto) -> onnx.ModelProto:
        for output in model.graph.output:
            old = output.name
            output.name = old.upper()
            for node in model.graph.node:
                node.output[:] = [output.name if name == old else name for name in node.output]
        return model
