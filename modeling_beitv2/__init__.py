"""BEiT v2 models for transformers: configs and models only (no data code).

Importing this package registers the model types with transformers' Auto classes, and marks the classes so
that `save_pretrained` also writes their code (loadable with `trust_remote_code=True` without this package).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    AutoModelForSemanticSegmentation,
)

from .attention import (
    BEIT_FLEX_ATTENTION,
    FlexAttentionOptions,
    get_flex_attention_options,
    resize_relative_position_bias_table,
    set_flex_attention_options,
)
from .configuration_beitv2 import BEITV2_PRESETS, BeitV2Config
from .configuration_dvae import DVAEConfig
from .configuration_pixel_decoder import VQKDPixelDecoderConfig
from .configuration_vqkd import VQKD_PRESETS, VQKDConfig, VQKDDecoderConfig, VQKDEncoderConfig
from .export_native import convert_mim_to_native_beit, convert_to_native_feature_extractor
from .export_required import BeitV2NeedsNativeExport
from .modeling_beitv2 import (
    BeitV2ForMaskedImageModeling,
    BeitV2MaskedImageModelingOutput,
    BeitV2Model,
    BeitV2PreTrainedModel,
)
from .modeling_dvae import DVAEModel, DVAEOutput
from .modeling_pixel_decoder import VQKDPixelDecoder, VQKDPixelDecoderOutput
from .modeling_vqkd import VQKDModel, VQKDOutput
from .quantizer import NormEMAVectorQuantizer, QuantizerOutput
from .teachers import TeacherForPatchTargets

AutoConfig.register(BeitV2Config.model_type, BeitV2Config, exist_ok=True)
AutoModel.register(BeitV2Config, BeitV2Model, exist_ok=True)
AutoModelForMaskedImageModeling.register(BeitV2Config, BeitV2ForMaskedImageModeling, exist_ok=True)
# A pretraining checkpoint loaded as a task model gets an error naming the native export, not a generic one.
AutoModelForImageClassification.register(BeitV2Config, BeitV2NeedsNativeExport, exist_ok=True)
AutoModelForSemanticSegmentation.register(BeitV2Config, BeitV2NeedsNativeExport, exist_ok=True)
BeitV2Config.register_for_auto_class()
BeitV2Model.register_for_auto_class("AutoModel")
BeitV2ForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")
for _config_class, _model_class in (
    (VQKDConfig, VQKDModel),
    (DVAEConfig, DVAEModel),
    (VQKDPixelDecoderConfig, VQKDPixelDecoder),
):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _model_class, exist_ok=True)
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModel")
# The tokenizer's sub-configs, so that `AutoConfig` resolves their model types too.
for _sub_config_class in VQKDConfig.sub_configs.values():
    AutoConfig.register(_sub_config_class.model_type, _sub_config_class, exist_ok=True)

__all__ = [
    "BEITV2_PRESETS",
    "BEIT_FLEX_ATTENTION",
    "DVAEConfig",
    "DVAEModel",
    "DVAEOutput",
    "FlexAttentionOptions",
    "NormEMAVectorQuantizer",
    "QuantizerOutput",
    "TeacherForPatchTargets",
    "VQKDConfig",
    "VQKDDecoderConfig",
    "VQKDEncoderConfig",
    "VQKDModel",
    "VQKDOutput",
    "VQKDPixelDecoder",
    "VQKDPixelDecoderConfig",
    "VQKDPixelDecoderOutput",
    "VQKD_PRESETS",
    "BeitV2Config",
    "BeitV2ForMaskedImageModeling",
    "BeitV2MaskedImageModelingOutput",
    "BeitV2NeedsNativeExport",
    "BeitV2Model",
    "BeitV2PreTrainedModel",
    "convert_mim_to_native_beit",
    "convert_to_native_feature_extractor",
    "get_flex_attention_options",
    "resize_relative_position_bias_table",
    "set_flex_attention_options",
]
