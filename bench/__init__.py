"""Benchmarks of mediatag, run with ``make bench`` (``python -m bench``); not tests."""
