"""Shared helpers of the inference tests: the plan and run-directory factories live in tests/conftest.py
(fixtures ``plan_factory`` and ``save_run``)."""
