"""The README's Python example runs as written (on the shipped model) and does what it says."""
import contextlib
import io
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_runtime_example_runs():
    text = open(os.path.join(REPO, "README.md")).read()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(block, "README.md", "exec"), scope)
    out, res = scope["out"], scope["res"]
    assert "#### 42" in out.texts[0]
    assert out.stats.skipped_layer_evaluations > 0
    assert len(res.loglikelihoods) == 1 and res.loglikelihoods[0] < 0


def test_readme_commands_exist():
    text = open(os.path.join(REPO, "README.md")).read()
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in text and os.path.exists(os.path.join(REPO, script))
    assert "bash scripts/test.sh" in open(os.path.join(REPO, ".ci", "run")).read()
