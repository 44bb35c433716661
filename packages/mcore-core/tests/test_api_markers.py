"""The API stability markers: what they record and the warnings ``@deprecated`` gives."""

from __future__ import annotations

import warnings

import pytest

from mcore.core.api import api_status, deprecated, experimental_api, internal_api


def test_internal_and_experimental_mark_without_changing_behaviour():
    @internal_api
    def helper(x):
        return x + 1

    @experimental_api
    class Thing:
        def __init__(self, n):
            self.n = n

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert helper(1) == 2
        assert Thing(3).n == 3
    assert api_status(helper) == "internal"
    assert api_status(Thing) == "experimental"
    assert api_status(len) == "public"


def test_deprecated_function_warns_with_alternative_and_still_works():
    @deprecated(version="0.2", removal_version="0.4", alternative="new_add")
    def old_add(a, b=1):
        """Add."""
        return a + b

    with pytest.warns(DeprecationWarning, match=r"old_add is deprecated since 0\.2") as record:
        assert old_add(1, b=2) == 3
    message = str(record[0].message)
    assert "removed in 0.4" in message and "use new_add instead" in message
    # The warning points at the caller, not at the wrapper.
    assert record[0].filename == __file__
    assert old_add.__doc__ == "Add."
    assert api_status(old_add) == "deprecated"
    assert old_add.__mcore_deprecation__.removal_version == "0.4"


def test_deprecated_class_warns_on_construction_not_for_subclasses():
    @deprecated(version="0.2", removal_version="0.4", alternative="NewRouter")
    class OldRouter:
        def __init__(self, k):
            self.k = k

    with pytest.warns(DeprecationWarning, match="use NewRouter instead"):
        assert OldRouter(2).k == 2

    class Mine(OldRouter):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Mine(5).k == 5
    assert isinstance(Mine(1), OldRouter)


@pytest.mark.parametrize("field", ["version", "removal_version", "alternative"])
def test_deprecated_refuses_missing_fields(field):
    kwargs = {"version": "0.2", "removal_version": "0.4", "alternative": "x"}
    kwargs[field] = ""
    with pytest.raises(TypeError, match=field):
        deprecated(**kwargs)
