"""Kept so that task specs and imports written for earlier releases (`selfee_fast.tasks:ListOps`) still work.

The tasks live in `selfee_fast.demo.tasks`.
"""

from .demo.tasks import *  # noqa: F403
from .demo.tasks import __all__  # noqa: F401
