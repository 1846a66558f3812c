"""xstilts: does English intermediate-task training still help zero-shot cross-lingual
transfer as the multilingual model grows? One spec, a laptop or a GPU cluster."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xstilts")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
