"""Our kernels folder must never be taken for Hugging Face's `kernels` distribution (issue 2)."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = r"""
import importlib.metadata, importlib.util, json, os
spec = importlib.util.find_spec("kernels")
origin = None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))
ours = importlib.util.find_spec("fastdllm_kernels")
dists = importlib.metadata.packages_distributions()
out = {"kernels_origin": origin, "fastdllm_kernels": ours.origin, "kernels_dists": dists.get("kernels", [])}
try:
    from transformers.utils.import_utils import is_kernels_available
    out["transformers_kernels"] = is_kernels_available()
except ImportError:
    out["transformers_kernels"] = None
print(json.dumps(out))
"""


def _probe(cwd):
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, check=True)
    import json
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_installed_import_name_is_fastdllm_kernels_not_kernels(tmp_path):
    out = _probe(str(tmp_path))
    assert out["fastdllm_kernels"].startswith(os.path.join(REPO, "kernels")) or "site-packages" in out["fastdllm_kernels"]
    assert "fastdllm" not in out["kernels_dists"]
    if out["kernels_origin"] is not None:                 # Hugging Face's own `kernels` may be installed
        assert REPO not in out["kernels_origin"]


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_transformers_does_not_take_our_kernels_for_its_hub_kernels(tmp_path, where):
    pytest.importorskip("transformers", reason="the check is about transformers' import probe")
    out = _probe(REPO if where == "repo_root" else str(tmp_path))
    assert out["transformers_kernels"] is False
