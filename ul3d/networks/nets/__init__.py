from .aulunet import AULUNET_VARIANTS, AULUNet
from .ultralightunet import ULTRALIGHTUNET_VARIANTS, UltraLightUNet

__all__ = ["AULUNet", "AULUNET_VARIANTS", "UltraLightUNet", "ULTRALIGHTUNET_VARIANTS"]
