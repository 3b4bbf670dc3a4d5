"""lra-kernels: INT8 (W8A8) OpenCLIP vision transformers with layer-wise early exits.

    from lra_kernels import QuantEarlyExitViT
    qvit = QuantEarlyExitViT.from_open_clip(clip.visual)   # INT8, full depth
    clip.visual = qvit                                      # drop-in

    from lra_kernels import QuantCLIP
    qclip = QuantCLIP.from_open_clip(clip)                  # both towers INT8, open_clip's encode_* / forward
"""

from .clip import QuantCLIP
from .config import QuantConfig, VisionArch
from .model import QuantEarlyExitViT
from .policy import ExitPolicy
from .validate import ModelLoadError

__all__ = ["QuantEarlyExitViT", "QuantCLIP", "ExitPolicy", "QuantConfig", "VisionArch", "ModelLoadError"]
__version__ = "0.1.0"
