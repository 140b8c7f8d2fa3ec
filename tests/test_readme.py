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


def _what_is_where():
    text = open(os.path.join(REPO, "README.md")).read()
    table = text.split("## What is where", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_what_is_where_matches_the_tree():
    """The table names every top-level part and every module of the packages, and names nothing that is gone."""
    rows = _what_is_where()
    tracked = {p.split("/")[0] + ("/" if "/" in p else "")
               for p in os.popen(f"git -C {REPO} ls-files").read().split()}
    for top in tracked:
        if top.startswith(".") or top in ("README.md", "setup.py"):
            continue
        assert any(key == top or key.startswith(top) for key in rows), f"README's table lacks {top}"
    for key, what in rows.items():
        assert os.path.exists(os.path.join(REPO, key)), f"README's table names {key}, which does not exist"
        if key not in ("fastdllm_rt/", "evalbridge/"):
            continue
        for name in re.findall(r"`([\w.]+(?:\.py|/)?)`", what):
            if name.endswith(".py") or (name.endswith("/") and "." not in name):
                assert os.path.exists(os.path.join(REPO, key, name)), f"{key}{name} named in README does not exist"
        folder = os.path.join(REPO, key)
        if key in ("fastdllm_rt/", "evalbridge/"):
            for f in sorted(os.listdir(folder)):
                if f.endswith(".py") and f != "__init__.py":
                    assert f"`{f}`" in what, f"README's table does not say what {key}{f} is"
        if key == "kernels/":
            for d in sorted(os.listdir(folder)):
                if os.path.isdir(os.path.join(folder, d)) and not d.startswith("_"):
                    assert f"`{d}`" in what, f"README's table does not name kernels/{d}"
