"""BEiT v2 models for transformers: configs and models only (no data code).

Importing this package registers the model types with transformers' Auto classes.
"""

from .configuration_beitv2 import BEITV2_PRESETS, BeitV2Config

__all__ = ["BEITV2_PRESETS", "BeitV2Config"]
