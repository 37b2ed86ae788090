import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from conftest import model_path
from poprt_lite import ir
from poprt_lite.errors import PassError
from poprt_lite.passes import Pass, PassContext, PassManager, PassResult, get_pass


class Raises(Pass):
    name = "raises"

    def run(self, graph, ctx):
        raise ValueError("boom")


class BreaksGraph(Pass):
    name = "breaks_graph"

    def run(self, graph, ctx):
        # A MatMul between incompatible shapes: strict shape inference must reject it.
        node = next(n for n in graph.nodes if n.op == "MatMul")
        node.inputs[1] = gs.Constant("bad_weight", np.zeros((3, 5), np.float32))
        return PassResult(changed=True)


class AddsOutputScale(Pass):
    name = "noop_changed"

    def run(self, graph, ctx):
        ctx.metadata["seen"] = "yes"
        return PassResult(changed=False, message="looked")


@pytest.fixture
def model():
    return ir.load_model(model_path("bert_qa_torchscript"))


def test_records_name_time_change_and_message(model):
    out, records = PassManager([get_pass("eliminate_identity")(), AddsOutputScale()]).run(model)
    assert [r.name for r in records] == ["eliminate_identity", "noop_changed"]
    assert records[1].changed is False and records[1].message == "looked"
    assert all(r.seconds >= 0 for r in records)
    assert ir.get_metadata(out)["seen"] == "yes"


def test_pass_that_raises_is_named(model):
    with pytest.raises(PassError, match=r"^pass 'raises' crashed: ValueError: boom$"):
        PassManager([Raises()]).run(model)


def test_pass_that_leaves_invalid_graph_is_named(model):
    with pytest.raises(PassError, match=r"^pass 'breaks_graph' left an invalid model: "):
        PassManager([BreaksGraph()]).run(model)


def test_dump_after_writes_intermediate_models(model, tmp_path):
    manager = PassManager(
        [get_pass("eliminate_identity")(), get_pass("fold_constants")()], dump_after=["fold_constants"], dump_dir=tmp_path
    )
    out, _ = manager.run(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_fold_constants.onnx"]
    assert len(onnx.load(tmp_path / "01_fold_constants.onnx").graph.node) == len(out.graph.node)


def test_dump_after_unknown_pass_is_refused(tmp_path):
    with pytest.raises(Exception, match="^dump_after names nope, which is not in the pipeline"):
        PassManager([get_pass("fold_constants")()], dump_after=["nope"], dump_dir=tmp_path)


def test_output_is_toposorted_and_checked(model):
    out, _ = PassManager([get_pass("fold_constants")()]).run(model)
    onnx.checker.check_model(out, full_check=True)
    produced = {i.name for i in out.graph.input} | {i.name for i in out.graph.initializer}
    for node in out.graph.node:
        assert all(not name or name in produced for name in node.input), node.name
        produced.update(node.output)


def test_fold_constants_removes_shape_arithmetic_without_changing_results(model, rng):
    from conftest import make_request, run

    out, records = PassManager([get_pass("fold_constants")()]).run(model)
    assert records[0].changed
    assert len(out.graph.node) < len(model.graph.node)
    feeds = make_request(rng, 7)
    for want, got in zip(run(model, feeds), run(out, feeds), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


class QuietEpsilon(Pass):
    """Edits the graph but reports changed=False: the edit must be kept all the same."""

    name = "quiet_epsilon"

    def run(self, graph, ctx):
        for node in graph.nodes:
            if node.op == "LayerNormalization":
                node.attrs["epsilon"] = 0.5
        return PassResult(changed=False, message="epsilons set")


def _epsilons(model: onnx.ModelProto) -> list[float]:
    return [a.f for n in model.graph.node if n.op_type == "LayerNormalization" for a in n.attribute if a.name == "epsilon"]


def test_edit_reported_as_unchanged_is_kept(model):
    assert _epsilons(model) and set(_epsilons(model)) != {0.5}
    out, records = PassManager([QuietEpsilon(), get_pass("fold_constants")()]).run(model)
    assert len(_epsilons(out)) == len(_epsilons(model))
    assert set(_epsilons(out)) == {0.5}
    assert records[0].changed is False and records[0].message == "epsilons set"


def test_invalid_edit_reported_as_unchanged_is_still_checked(model):
    class QuietBreak(BreaksGraph):
        name = "quiet_break"

        def run(self, graph, ctx):
            super().run(graph, ctx)
            return PassResult(changed=False)

    with pytest.raises(PassError, match=r"^pass 'quiet_break' left an invalid model: "):
        PassManager([QuietBreak()]).run(model)


def test_pass_must_return_a_pass_result(model):
    class ReturnsNothing(Pass):
        name = "returns_nothing"

        def run(self, graph, ctx):
            graph.nodes[0].name = "renamed"

    with pytest.raises(PassError) as info:
        PassManager([ReturnsNothing()]).run(model)
    assert str(info.value) == "pass 'returns_nothing' returned NoneType; run() must return a PassResult"


QUIET_EPSILON_PLUGIN = '''
import onnx_graphsurgeon as gs
from poprt_lite.passes import Pass, PassResult, register_pass


@register_pass("quiet_epsilon_plugin")
def quiet_epsilon_plugin(graph: gs.Graph, ctx) -> PassResult:
    """Set every LayerNormalization epsilon to 0.5 and say nothing changed."""
    for node in graph.nodes:
        if node.op == "LayerNormalization":
            node.attrs["epsilon"] = 0.5
    return PassResult(changed=False)


@register_pass("returns_bool")
class ReturnsBool(Pass):
    """Edit the graph and return a bool (only a function pass may)."""

    def run(self, graph, ctx):
        graph.nodes[0].name = "renamed"
        return True
'''


def test_cli_keeps_plugin_edit_reported_as_unchanged(tmp_path, capsys):
    from poprt_lite.cli.main import main

    plugin = tmp_path / "quiet_epsilon_plugin.py"
    plugin.write_text(QUIET_EPSILON_PLUGIN)
    output = tmp_path / "out.onnx"
    argv = ["--input_model", str(model_path("bert_qa_torchscript")), "--output_model", str(output), "--plugin", str(plugin)]
    assert main([*argv, "--passes", "quiet_epsilon_plugin"]) == 0, capsys.readouterr().err
    assert set(_epsilons(onnx.load(output))) == {0.5}
    capsys.readouterr()
    output.unlink()
    assert main([*argv, "--passes", "returns_bool"]) == 2
    err = capsys.readouterr().err
    assert err == "error: pass 'returns_bool' returned bool; run() must return a PassResult\n"
    assert not output.exists()
