"""lra-kernels: INT8 (W8A8) OpenCLIP vision transformers with layer-wise early exits.

    from lra_kernels import QuantEarlyExitViT
    qvit = QuantEarlyExitViT.from_open_clip(clip.visual)   # INT8, full depth
    clip.visual = qvit                                      # drop-in
"""

from .config import QuantConfig, VisionArch
from .model import QuantEarlyExitViT
from .policy import ExitPolicy
from .validate import ModelLoadError

__all__ = ["QuantEarlyExitViT", "ExitPolicy", "QuantConfig", "VisionArch", "ModelLoadError"]
__version__ = "0.1.0"
