"""unbackdoor: remove backdoors from trained networks with a small clean dataset, and measure it.

Generative LMs: :mod:`unbackdoor.lm` (CROW). Classifiers: :mod:`unbackdoor.classify` (ULRL).
"""
from .core.errors import (ConfigError, DataError, ModelError, NumericalError, UnbackdoorError,
                          UnsafeFileError)

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "ModelError", "NumericalError", "UnbackdoorError", "UnsafeFileError",
           "__version__"]
