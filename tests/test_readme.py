"""Keep the README true: every python block in it runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


# The budget example calibrates the digits model, evaluates site sets and compiles it through
# Inductor (about a minute): it runs in the extended tier, with `vmeanba demo`'s test.
@pytest.mark.parametrize("index", [
    pytest.param(i, marks=pytest.mark.extended) if "select_for_budget(" in block else i for i, block in enumerate(BLOCKS)
])
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)
    for name, value in list(namespace.items()):  # property tests defined in a block run too
        if name.startswith("test_") and callable(value):
            _with_few_examples(value)()
    torch._dynamo.reset()


# A README property test runs here to show the block works; its properties are checked with the
# full example counts by the suite's own tests (test_vmeanba_rewrite.py), so one example does.
README_MAX_EXAMPLES = 1


def _with_few_examples(test):
    """`test` with at most README_MAX_EXAMPLES hypothesis examples (unchanged if not a property
    test). Hypothesis refuses a second @settings, so the settings it stored are replaced."""
    from hypothesis import settings

    stored = getattr(test, "_hypothesis_internal_use_settings", None)
    if stored is not None and stored.max_examples > README_MAX_EXAMPLES:
        test._hypothesis_internal_use_settings = settings(stored, max_examples=README_MAX_EXAMPLES)
    return test
