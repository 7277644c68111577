"""Benchmarks, metrics and reports for judges (``reflectagent.eval``); see issue 5."""
