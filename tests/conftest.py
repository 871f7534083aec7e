import os

from hypothesis import HealthCheck, settings

# CI runs the whole suite in minutes on 2 cores: bounded example counts, no per-example deadline
# (timing on a shared machine is not what these tests check).
settings.register_profile(
    "smaq", max_examples=int(os.environ.get("SMAQ_HYPOTHESIS_EXAMPLES", "60")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("smaq")
