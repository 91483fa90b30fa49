"""edgephi.benchmarks: benchmark and evaluation code (`edgephi bench`, `edgephi check`), kept out of the runtime.

Installed as the subpackage edgephi.benchmarks (pyproject.toml maps this folder to it); the scripts here also run
as `python benchmarks/<script>.py` from a checkout.
"""
