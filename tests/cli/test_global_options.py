"""-v, --quiet and --debug are declared once and taken by every subcommand, before or after its name."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import model_path
from poprt_lite.cli import main as cli_main
from poprt_lite.cli.main import main
from poprt_lite.errors import PoprtError

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
BERT = str(model_path("bert_qa_torchscript"))
MISSING = "no/such.onnx"

# Per subcommand: arguments that succeed quickly, and arguments that fail with a PoprtError (None: cannot fail).
COMMANDS = {
    "convert": (["--list_all_ops"], ["--input_model", MISSING], "error: model file 'no/such.onnx' does not exist; check --input_model\n"),
    "passes": ([], ["--plugin", "no/such.py"], "error: plugin file 'no/such.py' does not exist; check --plugin\n"),
    "ops": ([], None, None),
    "diff": ([BERT, BERT], [MISSING, BERT], f"error: '{MISSING}' does not exist or is not a file\n"),
    "inspect": ([BERT], [MISSING], f"error: '{MISSING}' does not exist or is not a file\n"),
    "bench": (None, ["--small", "--model", MISSING], f"error: model '{MISSING}' does not exist\n"),
    "embed": (None, [MISSING, "--input", "lines.txt", "--output", "v.npy"], f"error: model '{MISSING}' does not exist; pass an artifact, an .onnx file or a model folder\n"),
    "export": (None, [MISSING, "-o", "m.onnx"], f"error: model folder '{MISSING}' does not exist\n"),
    "serve": (None, [MISSING], f"error: model '{MISSING}' does not exist; pass an artifact, an .onnx file or a model folder\n"),
    "tf2onnx": (None, ["--saved_model"], "error: tf2onnx is not supported: convert TensorFlow models to ONNX with the tf2onnx package first\n"),
}
FLAGS = ["-v", "--verbose", "--quiet", "--debug"]


def test_every_subcommand_is_covered():
    assert set(COMMANDS) == set(cli_main.COMMANDS)


def _positions(command: str, args: list[str], flag: str) -> list[list[str]]:
    return [[flag, command, *args], [command, flag, *args], [command, *args, flag]]


def _checked(command: str, flag: str) -> bool:
    """Whether the test below runs `command` with `flag`: with --debug a failing command raises
    (test_debug_shows_the_traceback_in_every_subcommand), so a command without quick success
    arguments has nothing to check there."""
    ok, failing, _ = COMMANDS[command]
    return ok is not None or (failing is not None and flag != "--debug")


@pytest.mark.parametrize("command, flag", [(c, f) for c in sorted(COMMANDS) for f in FLAGS if _checked(c, f)])
def test_global_flag_is_taken_before_and_after_the_subcommand(capsys, command, flag):
    ok, failing, message = COMMANDS[command]
    if ok is not None:
        for argv in _positions(command, ok, flag):
            assert main(argv) == 0, (argv, capsys.readouterr().err)
            assert capsys.readouterr().err == "", argv
    if failing is not None and flag != "--debug":
        for argv in _positions(command, failing, flag):
            assert main(argv) == 2, argv
            assert capsys.readouterr().err == message, argv


@pytest.mark.parametrize("command", sorted(name for name, (_, failing, _) in COMMANDS.items() if failing is not None))
def test_debug_shows_the_traceback_in_every_subcommand(capsys, command):
    _, failing, message = COMMANDS[command]
    for argv in _positions(command, failing, "--debug"):
        with pytest.raises(PoprtError) as raised:
            main(argv)
        assert f"error: {raised.value}\n" == message


def test_the_flat_convert_form_takes_global_flags_first(tmp_path, capsys):
    for argv in (["--quiet", "--input_model", BERT], ["--input_model", BERT, "--quiet"], ["--debug", "--quiet", "--input_model", BERT]):
        assert main([*argv, "--output_dir", str(tmp_path)]) == 0
        assert capsys.readouterr() == ("", "")
    assert main(["-v", "--input_model", BERT, "--output_dir", str(tmp_path)]) == 0
    assert "wrote " in capsys.readouterr().out


@pytest.mark.parametrize("position", [0, 1, 3, 9])
def test_verbose_logs_what_plugins_registered_and_the_pipeline(caplog, capsys, tmp_path, position):
    plugin = str(PLUGINS / "scale_outputs.py")
    argv = ["convert", "--plugin", plugin, "--input_model", BERT, "--output_dir", str(tmp_path), "--passes", "fold_constants,scale_outputs"]
    argv.insert(position, "-v")
    with caplog.at_level(logging.NOTSET):
        assert main(argv) == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"plugin {plugin} registered scale_outputs, count_matmuls" in messages
    assert "pass fold_constants: size_threshold_mb=64" in messages
    assert "pass scale_outputs: scale=1.0" in messages


def test_without_verbose_nothing_is_logged(caplog, capsys, tmp_path):
    with caplog.at_level(logging.NOTSET):
        assert main(["passes", "--plugin", str(PLUGINS / "scale_outputs.py")]) == 0
    assert [r for r in caplog.records if r.name.startswith("poprt_lite") and r.levelno < logging.WARNING] == []


def test_quiet_wins_over_verbose(tmp_path, capsys):
    assert main(["-v", "convert", "--input_model", BERT, "--output_dir", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert logging.getLogger("poprt_lite").level == logging.NOTSET  # restored after the command


def test_plugin_option_is_one_declaration():
    from poprt_lite.cli import convert, listing, options
    import inspect

    for command in (convert.convert, listing.passes_command):
        assert inspect.signature(command).parameters["plugin"].annotation in (options.PluginOption, "options.PluginOption")
