import pytest

from conftest import model_path
from poprt_lite import ir
from poprt_lite.errors import PassError
from poprt_lite.passes import PassManager, get_pass


def pin(name, shapes):
    return PassManager([get_pass("static_shape")(input_shape=shapes)]).run(ir.load_model(model_path(name)))[0]


def test_inputs_sharing_symbolic_dims_follow_the_pinned_one():
    model = pin("bert_qa_torchscript", {"input_ids": (4, 32)})
    assert {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input} == {
        "input_ids": [4, 32], "attention_mask": [4, 32], "token_type_ids": [4, 32],
    }
    assert [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output] == [[4, 32], [4, 32]]


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"input_ids": (4, 32, 2)}, "--input_shape gives 'input_ids' 3 dims but the input has rank 2 ([batch,sequence])"),
        ({"input_ids": (4, 32), "attention_mask": (4, 16)}, "--input_shape gives dim 'sequence' two values: 32 and 16"),
        ({"nope": (1, 2)}, "--input_shape names 'nope', which is not a model input; inputs are: input_ids, attention_mask, token_type_ids"),
    ],
)
def test_bad_shapes_are_named(shapes, message):
    with pytest.raises(PassError) as info:
        pin("bert_qa_torchscript", shapes)
    assert str(info.value) == f"pass 'static_shape' failed: {message}"
