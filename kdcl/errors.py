"""The one exception type for user-facing errors.

A :class:`KdclError` is bad input, not a bug: the CLI prints it as a single message
(what went wrong, and how to fix it) and exits non-zero, without a traceback.
"""

from __future__ import annotations


class KdclError(Exception):
    """An error caused by the user's input, configuration, data or environment."""

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if fix is None else f"{what}\n  fix: {fix}")


# How to install the packages text data and text models need (the ``text`` extra).
# What a missing data folder's message adds: where the recipes look (conf/config.yaml's paths).
DATA_DIR_HINT = "a recipe (+experiment=...) reads ${paths.data_dir}/NAME: set KDCL_DATA_DIR=DIR or paths.data_dir=DIR"
TEXT_EXTRA = 'pip install "kdcl[text]" (transformers, tokenizers)'
