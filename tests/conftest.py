"""Shared test settings: Hypothesis profiles and the float64 default for exactness tests."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI: deterministic and bounded, so a run is repeatable and the suite stays within minutes.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# Local digging: FAMO_HYPOTHESIS_PROFILE=deep make test
settings.register_profile(
    "deep",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("FAMO_HYPOTHESIS_PROFILE", "ci"))
