"""famo: FAMO (Fast Adaptive Multitask Optimization) loss weighting for PyTorch.

>>> from famo import FAMOWeighting
>>> FAMOWeighting(["seg", "depth", "normal"]).weights
tensor([0.3333, 0.3333, 0.3333])
"""

from famo._weighting import FORMAT_VERSION, GAMMA_PRESETS, FAMOWeighting

__all__ = ["FORMAT_VERSION", "GAMMA_PRESETS", "FAMOWeighting"]
__version__ = "0.1.0"
