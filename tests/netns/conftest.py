"""Fixtures shared by the namespace tests."""

from tests.netns.test_net_run import workdir  # noqa: F401  (re-exported fixture)
