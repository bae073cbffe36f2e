"""The shipped demo model writes plausible Python (benchmarks/demo_quality.py), and the checker itself."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import demo_quality  # noqa: E402

import mixtral_jax as mj  # noqa: E402
from mixtral_jax.checkpoint import demo_model_path  # noqa: E402


@pytest.mark.parametrize("prompt, continuation, failure", [
    ("def f(x):", "\n    return x + 1\n\nprint(f(2))\n", None),
    ("class A:", "\n    def m(self):\n        if self.x:", None),                 # open block closed
    ("import os", "\nimport sys\nx = os.path.join(", None),                       # incomplete last line dropped
    ("for i in x:", "\n    y = [i,\n", "does not parse"),                         # open bracket
    ("x = 1", "\n" + "y = 2\n" * 4, "repeated more than 3 times"),
    ("x = 1", "\n" + "y = 2\n" * 3, None),
    ("def g():", "\n    return" + " " * 41 + "1\n", "more than 40 spaces"),
    ("def g():", "\n    return 1 +\n", "does not parse"),
    ("if x:", "\n\n\n", None),                                                     # only the prompt: closed
])
def test_checker_rules(prompt, continuation, failure):
    got = demo_quality.check(prompt, continuation)
    assert (got is None) if failure is None else (got is not None and failure in got), got


def test_shipped_demo_model_writes_plausible_python():
    model = mj.load(demo_model_path())
    assert model.generation_config, "the demo model ships generation_config.json"
    results = demo_quality.evaluate(model, model.generation_config_kwargs())
    passed = [r["prompt"] for r in results if r["failure"] is None]
    assert len(passed) >= demo_quality.MIN_PASS, [(r["prompt"], r["failure"]) for r in results]
    assert "def fibonacci(n):" in passed  # the README's first command
