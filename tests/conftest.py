import os

import torch

# Triton kernels run in Triton's interpreter on machines without a GPU; it must be chosen before triton is
# imported anywhere. On a GPU the real compiler runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers.checkpoints import make_checkpoint  # noqa: E402

# What the original code computed on a tiny checkpoint: FASTDLLM_ORACLE_DIR, else an ``oracle`` folder in a
# ``shared`` folder beside the checkout (its checkpoint is not copied into the repository).
ORACLE_DIR = os.environ.get("FASTDLLM_ORACLE_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                                   "oracle")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("tiny_untied")), seed=1, tied=False)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("tiny_tied")), seed=2, tied=True)


@pytest.fixture(scope="session", autouse=True)
def _runtime_on_the_cpu_unless_asked():
    """The runtime tests compare with fp32 references computed on the CPU, so a runtime loaded without a
    device is placed there too - also on a machine with a GPU, where the library's default (cuda, bf16) would fail
    their 1e-5 references. Tests meant for the GPU pass
    ``device=`` explicitly (the kernel tests and tests/rt/test_triton_backend.py do)."""
    import fastdllm_rt.loader as loader

    real = loader.pick_device
    patch = pytest.MonkeyPatch()
    patch.setattr(loader, "pick_device", lambda device=None: real("cpu" if device in (None, "auto") else device))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny28(tmp_path_factory):
    """28 layers (so the named reuse subsets are the released ones), narrow enough to run fast on CPU."""
    return make_checkpoint(str(tmp_path_factory.mktemp("tiny28")), seed=5, hidden=32, heads=4, kv_heads=2,
                           inter=64)
