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
        ({"input_ids": (4, 32, 2)}, "input_shape gives 'input_ids' 3 dims but the input has rank 2 ([batch,sequence])"),
        ({"input_ids": (4, 32), "attention_mask": (4, 16)}, "input_shape gives dim 'sequence' two values: 32 and 16"),
        ({"nope": (1, 2)}, "input_shape names 'nope', which is not a model input; inputs are: input_ids, attention_mask, token_type_ids"),
    ],
)
def test_bad_shapes_are_named(shapes, message):
    with pytest.raises(PassError) as info:
        pin("bert_qa_torchscript", shapes)
    assert str(info.value) == f"pass 'static_shape' failed: {message}"


def pin_rows(name, shapes):
    return PassManager([get_pass("static_shape")(input_shape=shapes, dynamic_rows=True)]).run(ir.load_model(model_path(name)))[0]


def test_dynamic_rows_pin_every_dim_but_the_rows_and_record_their_bound():
    model = pin_rows("bert_qa_torchscript", {"input_ids": (4, 32)})
    dims = lambda v: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert {i.name: dims(i) for i in model.graph.input} == {
        "input_ids": ["batch", 32], "attention_mask": ["batch", 32], "token_type_ids": ["batch", 32],
    }
    assert [dims(o)[1] for o in model.graph.output] == [32, 32]
    assert ir.get_metadata(model)["rows"] == "4"


def test_dynamic_rows_run_any_number_of_rows_up_to_the_bound():
    import numpy as np
    import onnxruntime as ort

    model = pin_rows("bert_qa_torchscript", {"input_ids": (4, 32)})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(model_path("bert_qa_torchscript")), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for rows in (1, 3, 4):
        feeds = {"input_ids": rng.integers(3, 1000, (rows, 32)), "attention_mask": np.ones((rows, 32), np.int64),
                 "token_type_ids": np.zeros((rows, 32), np.int64)}
        for got, want in zip(session.run(None, feeds), original.run(None, feeds), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"input_ids": (4, 32), "attention_mask": (2, 32)}, "input_shape gives the rows (first dims) [2, 4]; with dynamic rows they must agree"),
    ],
)
def test_bad_dynamic_rows_are_named(shapes, message):
    with pytest.raises(PassError) as info:
        pin_rows("bert_qa_torchscript", shapes)
    assert str(info.value) == f"pass 'static_shape' failed: {message}"


def test_dynamic_rows_need_a_symbolic_first_dim(tmp_path):
    model = ir.load_model(model_path("bert_qa_torchscript"))
    for value in model.graph.input:
        value.type.tensor_type.shape.dim[0].dim_value = 4
    with pytest.raises(PassError) as info:
        PassManager([get_pass("static_shape")(input_shape={"input_ids": (4, 32)}, dynamic_rows=True)]).run(model)
    assert str(info.value) == (
        "pass 'static_shape' failed: input 'input_ids' has first dim 4; dynamic rows keep a symbolic first dim "
        "(export the model with a dynamic batch axis)"
    )
