"""Building blocks of ``benchmarks/asr_privacy_utility.py`` (grid, cells, report, plots)."""
