"""The real Slurm the grid's tests submit to (tests/sbatch/slurm_cluster.py): one per test session, shared by
pytest-xdist workers. Where Slurm cannot be installed the tests that need it skip with the reason, except under
CI (CI set), where skipping them would hide the grid's most important tests: there they fail."""
import os

import pytest

from tests.sbatch.slurm_cluster import shared, unavailable


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests, but {reason}")
        pytest.skip(reason)
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent                      # the session's folder, common to all workers
    with shared(str(base)) as cluster:
        yield cluster
