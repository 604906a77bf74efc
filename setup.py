"""Kept for the optional compiled extension that will live in csrc/.

All metadata is in pyproject.toml. A pure-Python install (`pip install .`) never needs a
compiler: csrc/ holds no sources yet, and when it does, the extension will be built only
when SELFEE_FAST_BUILD_EXT=1 is set.
"""

from setuptools import setup

setup()
