"""Benchmarks and studies of dpfl (scripts; not part of the installed package).

A regular package (not a namespace one), so that ``benchmarks._asr_study`` and friends resolve
here even when another installed distribution ships a top-level ``benchmarks`` package
(opacus does): a namespace package loses to a regular package anywhere on ``sys.path``.
"""
