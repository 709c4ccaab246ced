"""Shared fixtures: both implementations of the frame hot paths."""

import pytest

from wschat import frames

try:
    from wschat import _speedups
except ImportError:  # no compiler at install time: only the pure path exists
    _speedups = None

IMPLEMENTATIONS = {"python": frames._apply_mask_python}
if _speedups is not None:
    IMPLEMENTATIONS["c"] = _speedups.apply_mask


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def implementation(request, monkeypatch):
    """Run a test once per mask implementation (pure Python, and C when built)."""
    monkeypatch.setattr(frames, "apply_mask", IMPLEMENTATIONS[request.param])
    return request.param
