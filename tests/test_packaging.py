"""Our `kernels/` folder must never be taken for Hugging Face's `kernels` distribution.

Regression: with transformers 5.x (which installs and imports Hugging Face's `kernels`), running from the
repository root found our folder first (`cannot import name 'CUDAProperties' from 'kernels'`), because
`kernels/__init__.py` made it a regular package on the current directory's path entry.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = r"""
import importlib.util, json
out = {}
import fastdllm_kernels, fastdllm_kernels.attention.reference
out["ours"] = list(fastdllm_kernels.__path__)
try:
    import kernels
    out["kernels_file"] = getattr(kernels, "__file__", None)
    out["kernels_path"] = list(getattr(kernels, "__path__", []))
    out["hf_api"] = hasattr(kernels, "CUDAProperties")
except ImportError as e:
    out["kernels_error"] = str(e)
try:
    import transformers.integrations.hub_kernels  # imports Hugging Face's kernels when it is installed
    out["transformers_integration"] = "ok"
except ImportError as e:
    out["transformers_integration"] = repr(e)
print(json.dumps(out))
"""

OUR_FOLDER = os.path.join(REPO, "kernels")


def _probe(cwd):
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_kernels_is_hugging_faces_and_ours_is_fastdllm_kernels(tmp_path, where):
    out = _probe(REPO if where == "repo_root" else str(tmp_path))
    assert OUR_FOLDER in [os.path.abspath(p) for p in out["ours"]] or any("site-packages" in p for p in out["ours"])
    hf_installed = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; m.distribution('kernels')"],
                                  cwd=str(tmp_path), capture_output=True).returncode == 0
    if hf_installed:
        assert out["kernels_file"] and not out["kernels_file"].startswith(OUR_FOLDER + os.sep), out
        assert out["hf_api"], out
    else:  # nothing but our folder could answer; it must not be a package of its own
        assert out.get("kernels_file") is None, out
    assert out["transformers_integration"] == "ok", out


def test_our_folder_is_not_a_regular_package():
    """A `kernels/__init__.py` would make the folder outrank an installed `kernels` from the repository root."""
    assert not os.path.exists(os.path.join(OUR_FOLDER, "__init__.py"))
