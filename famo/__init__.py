"""famo: FAMO (Fast Adaptive Multitask Optimization) loss weighting for PyTorch.

>>> from famo import FAMOWeighting
>>> FAMOWeighting(["seg", "depth", "normal"]).weights
tensor([0.3333, 0.3333, 0.3333])
"""

from famo import functional
from famo._attach import Attachment
from famo._layout import FORMAT_VERSION
from famo._settings import GAMMA_PRESETS
from famo._version import __version__
from famo._weighting import FAMOWeighting

__all__ = [
    "FORMAT_VERSION",
    "GAMMA_PRESETS",
    "Attachment",
    "FAMOWeighting",
    "__version__",
    "functional",
]
