"""Messages name an option the way their reader gives it: a library user reads its Python name
(`input_shape`), the CLI user its flag (`--input_shape`). Library code spells options only through
`errors.option`; the CLI sets the spelling (`cli.options.flag`)."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest
import typer

import poprt_lite
from conftest import docstring_ids, model_path
from poprt_lite import compiler
from poprt_lite.cli import options as cli_options
from poprt_lite.cli.main import app, main
from poprt_lite.errors import PoprtError, option, spell_options
from poprt_lite.passes import PassManager, get_pass

PACKAGE = Path(poprt_lite.__file__).parent
BERT = model_path("bert_qa_torchscript")


def test_an_option_is_its_python_name_unless_the_cli_spells_it():
    assert [option(n) for n in ("input_shape", "pass_options", "load_plugin")] == ["input_shape", "pass_options", "load_plugin"]
    with spell_options(cli_options.flag):
        assert [option(n) for n in ("input_shape", "pass_options", "load_plugin")] == ["--input_shape", "--pass_option", "--plugin"]
    assert option("pass_options") == "pass_options"  # the spelling ends with the block


# ------------------------------------------------------------------ one mistake, two spellings


def _compile(**options):
    return poprt_lite.compile(BERT, options=poprt_lite.CompileOptions(**options), save=False)


def _build_pipeline(**options):
    return compiler.build_pipeline(poprt_lite.CompileOptions(**options))


MISTAKES = [
    pytest.param(
        lambda tmp: _compile(input_shape={"input_ids": (4, 32, 2)}),
        ["--input_shape", "input_ids=4,32,2"],
        "pass 'static_shape' failed: {input_shape} gives 'input_ids' 3 dims but the input has rank 2 ([batch,sequence])",
        id="input_shape-rank",
    ),
    pytest.param(
        lambda tmp: _compile(pack_args={"max_valid_num": "0"}),  # the README's example
        ["--pack_args", "max_valid_num=0"],
        "{pack_args} max_valid_num must be a positive integer, got 0",
        id="pack_args-positive",
    ),
    pytest.param(
        lambda tmp: _compile(pack_args={"max_valid_num": "4"}),
        ["--pack_args", "max_valid_num=4"],
        "{pack_args} needs segment_max_size=N (e.g. {pack_args} max_valid_num=40 segment_max_size=256), "
        "or {input_shape} input_ids=B,S to derive it",
        id="pack_args-missing-key",
    ),
    pytest.param(
        lambda tmp: _compile(input_shape={"input_ids": (2, 16)}, pack_args={"mode": "token_stream", "max_valid_num": "4", "segment_max_size": "16", "max_tokens": "64"}),
        ["--input_shape", "input_ids=2,16", "--pack_args", "mode=token_stream", "max_valid_num=4", "segment_max_size=16", "max_tokens=64"],
        "{input_shape} pins a static shape, but {pack_args} mode=token_stream keeps the token dimension dynamic; drop {input_shape}",
        id="token_stream-static",
    ),
    pytest.param(
        lambda tmp: _compile(precision="int4"),
        ["--precision", "int4"],
        "{precision} must be fp32, fp16 or int8, got 'int4'",
        id="precision",
    ),
    pytest.param(
        lambda tmp: _compile(dynamic_rows=True),
        ["--dynamic_rows"],
        "{dynamic_rows} keeps the first dim of {input_shape} dynamic; give {input_shape}",
        id="dynamic_rows",
    ),
    pytest.param(
        lambda tmp: _build_pipeline(pass_options={"nope": {"a": "1"}}),
        ["--pass_option", "nope.a=1"],
        "{pass_options} names pass 'nope', which is not in the pipeline",
        id="pass_options",
    ),
    pytest.param(
        lambda tmp: _compile(dump_after=["all"]),
        ["--dump_after", "all"],
        "{dump_after} needs a folder to write to; give {output_dir}",
        id="dump_after",
    ),
    pytest.param(
        lambda tmp: poprt_lite.compile(tmp / "missing.onnx", save=False),
        None,
        "model file '{tmp}/missing.onnx' does not exist; check {input_model}",
        id="input_model",
    ),
    pytest.param(
        lambda tmp: get_pass("nope"),
        ["--passes", "nope"],
        "unknown pass 'nope'; known passes: {known} (add your own with {load_plugin})",
        id="unknown-pass",
    ),
]


def _spell(template: str, spelling, tmp: Path) -> str:
    names = re.findall(r"\{(\w+)\}", template)
    known = ", ".join(sorted(poprt_lite.get_registered_passes()))
    values = {name: spelling(name) for name in names if name not in ("tmp", "known")}
    return template.format(**values, tmp=tmp, known=known)


@pytest.mark.parametrize(("call", "argv", "template"), MISTAKES)
def test_a_library_user_reads_option_names_and_the_cli_user_flags(call, argv, template, tmp_path, capsys):
    with pytest.raises(PoprtError) as info:
        call(tmp_path)
    assert str(info.value) == _spell(template, str, tmp_path)
    argv = argv or []
    model = str(tmp_path / "missing.onnx") if "input_model" in template else str(BERT)
    assert main(["--input_model", model, "--output_model", str(tmp_path / "m.onnx"), *argv]) == 2
    assert capsys.readouterr().err == f"error: {_spell(template, cli_options.flag, tmp_path)}\n"


def test_the_readme_quotes_both_spellings(capsys):
    readme = " ".join((PACKAGE.parent / "README.md").read_text().split())
    with pytest.raises(PoprtError) as info:
        poprt_lite.CompileOptions(pack_args={"max_valid_num": "0"})
    assert f"`PoprtError: {info.value}`" in readme
    assert main(["--input_model", str(BERT), "--pack_args", "max_valid_num=0"]) == 2
    assert f"`{capsys.readouterr().err.strip()}`" in readme


def test_dump_after_without_a_folder_names_the_option_for_a_pass_manager_user_too():
    with pytest.raises(PoprtError, match=r"^dump_after needs a folder to write to; give output_dir$"):
        PassManager([get_pass("fold_constants")()], dump_after=["all"])


def test_notices_name_options_as_the_reader_gives_them(caplog, tmp_path, capsys):
    with caplog.at_level(logging.WARNING):
        _build_pipeline(skip_passes=["float_to_half"], input_shape={"input_ids": (2, 16)},
                        pack_args={"max_valid_num": "4", "head_pattern": "x", "dynamic_groups": "[[input_ids,attention_mask]]"})
    assert [r.getMessage() for r in caplog.records] == [
        "pack_args head_pattern: not needed: poprt-lite finds the model's head and each output's layout by the graph's structure",
        "pack_args dynamic_groups: packs by 'input_ids'; attention_mask follow it by their role (no need to list them)",
        "skip_passes float_to_half: not in the pipeline (unfuse_ort, eliminate_identity, export_position_ids, pack_unpack_repack, "
        "static_shape, fold_constants, eliminate_dead_code), nothing to skip",
    ]


# ------------------------------------------------------------------ no flag in library messages

# Where `--flag` text is the CLI's own: the CLI and PopRT's flag table.
CLI_TEXT = ("cli/", "compat/poprt_options.py")
FLAG = re.compile(r"(?:^|[\s(\[`'\"=])--[a-z]")


def _strings(tree: ast.AST):
    """String constants (f-string pieces included), leaving out docstrings."""
    docstrings = docstring_ids(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def flag_literals(root: Path) -> list[str]:
    """`--flag` text in the strings of the library under `root` (outside CLI_TEXT)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        if name.startswith(CLI_TEXT):
            continue
        for node in _strings(ast.parse(path.read_text(), name)):
            if FLAG.search(node.value):
                found.append(f"{name}:{node.lineno}: {node.value!r}")
    return found


def test_library_messages_name_no_cli_flag():
    assert flag_literals(PACKAGE) == []


def test_the_check_finds_flags_in_messages_and_log_lines_but_not_in_docstrings(tmp_path):
    (tmp_path / "m.py").write_text(
        '"""Set with --input_shape."""\n'
        'def f(x, log):\n'
        '    """Doc: --pack_args."""\n'
        '    log.warning("--skip_passes %s: nothing to skip", x)\n'
        '    raise ValueError(f"cannot write {x}; check --output_dir and free space")\n'
        'DASHES = "----"\n'
    )
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "c.py").write_text('MESSAGE = "--input_model is required"\n')
    assert flag_literals(tmp_path) == [
        "m.py:4: '--skip_passes %s: nothing to skip'",
        "m.py:5: '; check --output_dir and free space'",
    ]


def test_every_option_a_message_names_is_a_cli_flag():
    """`option(name)` under the CLI must spell a flag some command declares."""
    declared = {opt for command in typer.main.get_command(app).commands.values() for param in command.params for opt in param.opts}
    named = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "option":
                assert len(node.args) == 1 and isinstance(node.args[0], ast.Constant), f"{path}:{node.lineno}: option() takes a literal name"
                named.add(node.args[0].value)
    assert {"input_shape", "pack_args", "output_dir", "pass_options"} <= named
    assert {name: cli_options.flag(name) for name in named if cli_options.flag(name) not in declared} == {}
