"""Moved to :mod:`dmvae.demo` (the 2-D study is an example built on the library, not part of its
core). These names are re-exported so existing imports keep working; new code imports
``dmvae.demo``."""

from dmvae.demo import *  # noqa: F401,F403
from dmvae.demo import __all__  # noqa: F401
