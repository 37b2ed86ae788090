from pathlib import Path

import pytest

from poprt_lite import passes
from poprt_lite.errors import PoprtError
from poprt_lite.passes import Pass, get_pass, list_passes, load_plugin, register_pass

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
BUILTINS = {"eliminate_dead_code", "eliminate_identity", "export_position_ids", "float_to_half", "fold_constants", "static_shape"}


def test_builtins_are_registered_with_descriptions():
    names = {cls.name for cls in list_passes()}
    assert BUILTINS <= names
    for cls in list_passes():
        assert cls.description and "\n" not in cls.description


def test_unknown_pass_names_the_known_ones():
    with pytest.raises(PoprtError, match=r"^unknown pass 'nope'; known passes: .*fold_constants.* \(add your own with load_plugin\)$"):
        get_pass("nope")


def test_plugin_file_registers_class_and_function_passes():
    load_plugin(str(PLUGINS / "scale_outputs.py"))
    assert get_pass("scale_outputs").option_names() == ["scale"]
    assert get_pass("count_matmuls").description == "Record the number of MatMul nodes in the model metadata (poprt_lite.matmuls)."


def test_plugin_with_syntax_error_is_one_line():
    with pytest.raises(PoprtError) as info:
        load_plugin(str(PLUGINS / "broken_syntax.py"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"plugin '{PLUGINS / 'broken_syntax.py'}' failed to import: SyntaxError: ")
    assert "(broken_syntax.py, line 2)" in message


def test_plugin_missing_file_and_missing_module():
    with pytest.raises(PoprtError, match=r"^plugin file 'nowhere/x.py' does not exist; check load_plugin$"):
        load_plugin("nowhere/x.py")
    with pytest.raises(PoprtError, match=r"^plugin 'no_such_module_xyz' failed to import: ModuleNotFoundError: No module named 'no_such_module_xyz'$"):
        load_plugin("no_such_module_xyz")


def test_typed_options_from_strings():
    cls = get_pass("fold_constants")
    assert cls.from_strings({"size_threshold_mb": "8"}).options.size_threshold_mb == 8
    with pytest.raises(PoprtError, match=r"^option 'size_threshold_mb' of pass 'fold_constants' expects int, got 'big'$"):
        cls.from_strings({"size_threshold_mb": "big"})
    with pytest.raises(PoprtError, match=r"^pass 'fold_constants' has no option 'x'; its options are: size_threshold_mb$"):
        cls.from_strings({"x": "1"})


def test_duplicate_name_from_another_class_is_refused():
    @register_pass("dup_test_pass")
    class First(Pass):
        """first"""

    with pytest.raises(PoprtError, match="pass name 'dup_test_pass' is registered twice"):

        @register_pass("dup_test_pass")
        class Second(Pass):
            """second"""


def test_entry_point_plugins_are_loaded(monkeypatch):
    import importlib.metadata

    class FakeEntryPoint:
        name = "ep_pass"
        value = "some_dist.passes:EpPass"

        def load(self):
            class EpPass(Pass):
                """Pass from an entry point."""

                name = "ep_pass"

            return EpPass

    monkeypatch.setattr(passes.registry, "_loaded_entry_points", False)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [FakeEntryPoint()] if group == "poprt_lite.passes" else [])
    assert get_pass("ep_pass").description == "Pass from an entry point."


def test_broken_entry_point_is_reported(monkeypatch):
    import importlib.metadata

    class Broken:
        name = "bad"
        value = "bad_dist.mod"

        def load(self):
            raise ImportError("cannot import name 'X'")

    monkeypatch.setattr(passes.registry, "_loaded_entry_points", False)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Broken()])
    with pytest.raises(PoprtError, match=r"^plugin 'bad_dist.mod' \(entry point 'bad' of group poprt_lite.passes\) failed to import: ImportError: cannot import name 'X'$"):
        list_passes()
