import os
import sys

from hypothesis import HealthCheck, settings

# CI runs the whole suite in minutes on 2 cores: bounded example counts, no per-example deadline
# (timing on a shared machine is not what these tests check).
settings.register_profile(
    "smaq", max_examples=int(os.environ.get("SMAQ_HYPOTHESIS_EXAMPLES", "60")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("smaq")

# Tests in every directory import the shared helpers as ``from helpers import ...``.
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


import numpy as _np  # noqa: E402
import pytest  # noqa: E402

try:
    import torch as _torch  # noqa: E402
except ImportError:  # pragma: no cover
    _torch = None


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same torch and NumPy RNG state: failures reproduce."""
    _np.random.seed(0)
    if _torch is not None:
        _torch.manual_seed(0)
    yield
