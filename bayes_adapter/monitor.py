"""Deprecated alias of :mod:`bayes_adapter.training_monitor` (renamed after 0.2.0), kept for one release only."""

import sys
import warnings

from . import training_monitor


warnings.warn(
    "bayes_adapter.monitor was renamed bayes_adapter.training_monitor after bayes-adapter 0.2.0; the old name is kept "
    "for one release and will then be removed. Import bayes_adapter.training_monitor instead.",
    FutureWarning,
    stacklevel=2,
)
# The old name is the new module itself, so attributes (and patches) seen through either name are the same.
sys.modules[__name__] = training_monitor
