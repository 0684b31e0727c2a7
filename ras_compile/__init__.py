"""Region-Adaptive Sampling for any Diffusion Transformer, as a torch.compile pass.

    from ras_compile import ras_compile, RASPolicy
    pipe.transformer = ras_compile(pipe.transformer, RASPolicy(sample_ratio=0.5))
"""
from .api import ras_compile
from .controller import RASController, StepStats
from .explain import Explanation, explain
from .errors import RASCallError, RASError, UnsupportedModelError
from .policy import RASPolicy
from .runtime import RASModule

__all__ = ["ras_compile", "RASPolicy", "explain", "Explanation", "RASModule", "RASController", "StepStats", "RASError",
           "RASCallError", "UnsupportedModelError"]
__version__ = "0.1.0"
