"""The benchmark suites (pytest-benchmark) and tuning scripts; a package, so that its conftest
and the one of tests/ do not collide when pytest collects both folders in one run."""
