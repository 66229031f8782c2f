"""Benchmarks and load tooling, kept out of the runtime package: ``aoi bench service`` (:mod:`benchmarks.service_bench`
with :mod:`benchmarks.raw_backend` and the lean HTTP client :mod:`benchmarks.loadgen`) and the ``bench_*.py`` scripts.

Nothing is imported here: ``aoi bench`` stays torch-free, while ``bench_mosaic.py`` needs ``train``.
"""
