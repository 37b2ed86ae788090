"""The suite catches the faults a converter could make without any error (issue 27): each mutant of
mutants.py is appended to every conversion the tests make, in a pytest run of the tests that should
catch it, and every one of those tests must fail; the same tests with the plugin loaded and no mutant
must pass.

- drop_output: a packed model loses its last output;
- shift_position: one token's position id in a packed model is one more than it should be;
- corrupt_fp16_token: one token of a float16 model's first output is 0.05 off (25x float16's largest
  error here): a mean over a request's tokens hides it, the largest error per request does not, and
  the PopRT example's own check does not see it (its padded baseline carries the same fault), the
  comparison with the source model does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mutation.mutants import MUTANTS

ROOT = Path(__file__).resolve().parents[2]
PACK_PASSES = "tests/passes/test_pack_passes.py"
DIFFERENTIAL = "tests/robustness/test_differential.py::test_every_api_gives_the_original_models_answers"
END_TO_END = "tests/runtime/test_pack_runner.py::test_bert_qa_end_to_end"
CAUGHT_BY = {  # mutant -> the tests that must fail
    "drop_output": [
        f"{PACK_PASSES}::test_batch_with_empty_rows[attention_mask]",
        f"{PACK_PASSES}::test_token_stream_batch_is_as_long_as_its_tokens[lengths2]",
        f"{DIFFERENTIAL}[bert_qa_torchscript-unpack_repack-online]",
        f"{DIFFERENTIAL}[roberta_qa-attention_mask-run_requests]",
        f"{END_TO_END}[attention_mask-PackAlgorithm.first_fit]",
    ],
    "shift_position": [
        f"{PACK_PASSES}::test_batch_with_empty_rows[unpack_repack]",
        f"{PACK_PASSES}::test_token_stream_batch_is_as_long_as_its_tokens[lengths2]",
        f"{DIFFERENTIAL}[bert_qa_torchscript-token_stream-pack_data_artifact]",
        f"{DIFFERENTIAL}[roberta_qa-attention_mask-online]",
        f"{END_TO_END}[unpack_repack-PackAlgorithm.first_fit]",
    ],
    "corrupt_fp16_token": [
        f"{PACK_PASSES}::test_fp16_packed_max_error_per_request[bert_qa_torchscript-attention_mask]",
        f"{PACK_PASSES}::test_fp16_packed_max_error_per_request[roberta_qa-token_stream]",
        "tests/passes/test_float_to_half.py::test_fp16_runs_on_cpu_and_max_error_is_small[distilbert_qa]",
        "tests/passes/test_fuse_packed_attention.py::test_float16_fused_model_matches_the_unfused_one_and_the_original",
        "tests/cli/test_poprt_compat.py::test_packed_bert_example_runs_on_the_run_sh_models",
    ],
}


def outcomes(tests: list[str], mutant: str, tmp_path: Path) -> dict[str, str]:
    """Run `tests` in a new pytest with `mutant` ('' for none); each test's outcome by its node id."""
    report = tmp_path / f"{mutant or 'control'}.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "POPRT_LITE_MUTANT": mutant}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "mutation.mutants", "-p", "no:cacheprovider", f"--junitxml={report}", *tests]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode in (0, 1), run.stdout[-3000:] + run.stderr[-3000:]
    found = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        path = case.get("classname").replace(".", "/")
        node = f"{path}.py::{case.get('name')}"
        failure = case.find("failure")
        found[node] = "passed" if len(case) == 0 else "failed" if failure is not None else case[0].tag
        if failure is not None:
            print(f"{mutant}: {node}: {failure.get('message', '').splitlines()[0][:200]}")
    return found


@pytest.mark.slow
def test_every_test_listed_passes_without_a_mutant(tmp_path):
    tests = sorted({t for listed in CAUGHT_BY.values() for t in listed})
    assert outcomes(tests, "", tmp_path) == dict.fromkeys(tests, "passed")


@pytest.mark.slow
@pytest.mark.parametrize("mutant", sorted(CAUGHT_BY))
def test_each_mutant_fails_the_tests_that_should_catch_it(mutant, tmp_path):
    assert set(CAUGHT_BY) == set(MUTANTS)
    tests = CAUGHT_BY[mutant]
    assert outcomes(tests, mutant, tmp_path) == dict.fromkeys(tests, "failed")
