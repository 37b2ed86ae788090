"""The vocabulary is spelled in one place: no module but poprt_lite/vocab.py writes a pack mode, an
input role, an output layout or a metadata key as a string literal."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import docstring_ids
from poprt_lite import vocab

PACKAGE = Path(vocab.__file__).parent
WORDS = {w.value for enum in (vocab.PackMode, vocab.Role, vocab.Layout, vocab.MetaKey) for w in enum}
# Words of other protocols that happen to be spelled as ours: the HTTP server's JSON field `data`
# (OpenAI's embeddings list, the Open Inference Protocol's tensor values).
PROTOCOL_WORDS = {("poprt_lite/apps/serve/", "data")}


def _literals(tree: ast.AST):
    """Plain string constants, leaving out docstrings, the text of f-strings (messages) and the
    option names messages spell with `errors.option` (Python parameter names, not vocabulary)."""
    skip = docstring_ids(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "option":
            skip.update(id(a) for a in node.args)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node


def vocabulary_literals(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in _literals(tree):
        text = node.value
        where = path.relative_to(root).as_posix()
        if any(where.startswith(folder) and text == word for folder, word in PROTOCOL_WORDS):
            continue
        if text in WORDS or text.startswith((vocab.ROLE_PREFIX, vocab.LAYOUT_PREFIX)):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {text!r}")
    return found


def test_no_vocabulary_literal_outside_vocab_module():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path.name != "vocab.py" for hit in vocabulary_literals(path)]
    assert offenders == []


def test_the_check_finds_a_literal_but_not_prose(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""Doc mentions packed."""\nMODE = "attention_mask"\nKEY = "layout.x"\nmessage = f"use mode=unpack_repack {KEY}; {option(\'precision\')}"\n')
    hits = [hit.split(": ", 1)[1] for hit in vocabulary_literals(source, root=tmp_path)]
    assert hits == ["'attention_mask'", "'layout.x'"]


@pytest.mark.parametrize("word", sorted(WORDS))
def test_every_word_round_trips(word):
    enum = next(e for e in (vocab.PackMode, vocab.Role, vocab.Layout, vocab.MetaKey) if word in {w.value for w in e})
    member = enum(word)
    assert member == word and str(member) == word and hash(member) == hash(word) and {word: 1}[member] == 1
