"""Deprecated: the datasets, transforms and loaders moved to :mod:`timm_qsenn.data`; this alias goes in the next
release."""

from __future__ import annotations

import warnings
from typing import Any

from .. import data


def __getattr__(name: str) -> Any:
    """Every public name of :mod:`timm_qsenn.data`, with a DeprecationWarning that says where it lives now."""
    if name in data.__all__:
        warnings.warn(
            f"timm_qsenn.train.data is deprecated and goes in the next release; import {name} from timm_qsenn.data",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
