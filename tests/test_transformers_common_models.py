"""transformers' own common tests on our models, configs and image processors.

`ModelTesterMixin`, `ConfigTester` and `ImageProcessingTestMixin` come from the test modules of the installed
transformers version (its source distribution; `tests/fetch_transformers_tests.py`, run by `make test`, puts them in
`build/transformers-tests/`). They are what transformers runs on its own BEiT: where they pass, our classes behave
like transformers' own wherever the ecosystem calls them (save/load, meta-device init, dtype handling, attention
implementations, output capturing, gradient checkpointing, processors' standard arguments).

The testers follow transformers' `BeitModelTester`: tiny configs, random inputs, stable labels. A skipped mixin test
says in one line why the feature does not apply to that model.
"""

from __future__ import annotations

import contextlib
import copy
import unittest
import unittest.mock
from collections.abc import Iterator

import torch
from conftest import import_transformers_tests
from torch import nn

from modeling_beitv2 import (
    BeitV2Config,
    BeitV2ForMaskedImageModeling,
    BeitV2Model,
    DVAEConfig,
    DVAEModel,
    VQKDConfig,
    VQKDModel,
    VQKDPixelDecoder,
    VQKDPixelDecoderConfig,
)
from modeling_beitv2.configuration_vqkd import vqkd_decoder_config, vqkd_encoder_config

modeling_common, configuration_common = import_transformers_tests("test_modeling_common", "test_configuration_common")
ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester
floats_tensor, ids_tensor = modeling_common.floats_tensor, modeling_common.ids_tensor


@contextlib.contextmanager
def registered_as_base_models(*model_classes: type) -> Iterator[None]:
    """The mixin's training tests skip base models (no loss) by looking their names up in transformers' static
    `MODEL_MAPPING_NAMES`, which cannot list a model registered with `AutoModel` at run time; list ours there while
    a test runs."""
    names = {f"_beitv2_hf_{cls.__name__}": cls.__name__ for cls in model_classes}
    with unittest.mock.patch.dict(modeling_common.MODEL_MAPPING_NAMES, names):
        yield


@contextlib.contextmanager
def deterministic_codebook_draws() -> Iterator[None]:
    """Codebooks are random unit vectors by design (VQ-KD's EMA state, `torch.randn` in the reference): make the draw
    deterministic, as the mixin itself zeroes `config.scale` for randomly drawn position buffers."""
    with unittest.mock.patch.object(torch, "randn_like", torch.ones_like):
        yield


class ImageModelTestMixin:
    """What transformers' own vision testers (`BeitModelTest`, `ViTModelTest`) override in the mixin."""

    @unittest.skip(reason="an image model: no inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="an image model: no inputs_embeds")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    def test_model_get_set_embeddings(self):
        # The mixin's version expects a token `nn.Embedding`; an image model's input embedding is its patch (or
        # first-layer) projection, as transformers' own vision tests check.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config))
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, nn.Linear))


# --------------------------------------------------------------------------------------------------------------------
# BeitV2Model and BeitV2ForMaskedImageModeling
# --------------------------------------------------------------------------------------------------------------------


class BeitV2ModelTester:
    """A 2-layer, 32-wide BEiT v2 on 32 px images with 8 px patches (a 4x4 grid of patches); the patch-aggregation
    head reads the output of the first block."""

    def __init__(self, parent, batch_size: int = 3, image_size: int = 32, patch_size: int = 8):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = 3
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.vocab_size = 64
        self.is_training = True
        self.num_patches = (image_size // patch_size) ** 2
        self.seq_length = self.num_patches + 1
        self.num_masks = 6  # masked patches per image (the MIM head needs a fixed count for stable labels)
        self.mask_length = self.num_patches

    def get_config(self) -> BeitV2Config:
        return BeitV2Config(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=37,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            vocab_size=self.vocab_size,
            early_layers=1,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        # The same masked positions in every call (stable labels); `num_masks` per image.
        bool_masked_pos = torch.zeros(self.batch_size, self.num_patches, dtype=torch.bool)
        bool_masked_pos[:, : self.num_masks] = True
        return self.get_config(), {"pixel_values": pixel_values, "bool_masked_pos": bool_masked_pos}


class BeitV2ModelTest(ImageModelTestMixin, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (BeitV2Model, BeitV2ForMaskedImageModeling)
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = BeitV2ModelTester(self)
        # BeitModelTest's `hidden_size=37` is not divisible by the default 12 heads, which BeitV2Config rejects.
        self.config_tester = ConfigTester(self, config_class=BeitV2Config, has_text_modality=False, hidden_size=36)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if model_class is BeitV2ForMaskedImageModeling and return_labels:
            generator = torch.Generator().manual_seed(0)
            batch = inputs["pixel_values"].shape[0]
            num_patches = self.model_tester.num_patches
            inputs["labels"] = torch.randint(
                0, self.model_tester.vocab_size, (batch, num_patches), generator=generator
            )
        return inputs

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_training(self):
        with registered_as_base_models(BeitV2Model):
            super().test_training()

    def test_training_gradient_checkpointing(self):
        with registered_as_base_models(BeitV2Model):
            super().test_training_gradient_checkpointing()

    def test_training_gradient_checkpointing_use_reentrant_false(self):
        with registered_as_base_models(BeitV2Model):
            super().test_training_gradient_checkpointing_use_reentrant_false()

    def test_training_gradient_checkpointing_use_reentrant_true(self):
        with registered_as_base_models(BeitV2Model):
            super().test_training_gradient_checkpointing_use_reentrant_true()


# --------------------------------------------------------------------------------------------------------------------
# VQKDModel
# --------------------------------------------------------------------------------------------------------------------

_TINY_VIT = dict(hidden_size=32, num_attention_heads=4, intermediate_size=37)


class VQKDModelTester:
    """A VQ-KD tokenizer on 32 px images, 8 px patches: 2-layer encoder, 1-layer decoder, 64 codes of dimension 8."""

    def __init__(self, parent, batch_size: int = 3):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = 32
        self.num_channels = 3
        self.is_training = True
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.seq_length = (32 // 8) ** 2 + 1
        self.teacher_dim = 16

    def get_config(self) -> VQKDConfig:
        return VQKDConfig(
            encoder_config=vqkd_encoder_config("tiny", image_size=32, patch_size=8, num_hidden_layers=2, **_TINY_VIT),
            decoder_config=vqkd_decoder_config("tiny", num_layers=1, grid_size=4, code_dim=8, **_TINY_VIT),
            codebook_size=64,
            code_dim=8,
            teacher_dim=self.teacher_dim,
            kmeans_init=False,
        )

    def prepare_config_and_inputs_for_common(self):
        # [0, 1] pixels: the tokenizer maps them itself.
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size], scale=1.0)
        return self.get_config(), {"pixel_values": pixel_values}


class VQKDModelTest(ImageModelTestMixin, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (VQKDModel,)
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = VQKDModelTester(self)
        self.config_tester = ConfigTester(self, config_class=VQKDConfig, has_text_modality=False)

    def test_init_weights_can_init_buffers(self):
        # The mixin compares the buffers of two builds for equality, which holds for deterministic buffers only.
        with deterministic_codebook_draws():
            super().test_init_weights_can_init_buffers()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            generator = torch.Generator().manual_seed(0)
            batch = inputs["pixel_values"].shape[0]
            num_patches = self.model_tester.seq_length - 1
            shape = (batch, num_patches, self.model_tester.teacher_dim)
            inputs["teacher_features"] = torch.randn(shape, generator=generator)
        return inputs

    def test_config(self):
        self.config_tester.run_common_tests()


# --------------------------------------------------------------------------------------------------------------------
# DVAEModel (BEiT v1's DALL-E tokenizer)
# --------------------------------------------------------------------------------------------------------------------


class DVAEModelTester:
    def __init__(self, parent, batch_size: int = 2):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = 32
        self.num_channels = 3
        # The released DALL-E dVAE is a frozen tokenizer here: this package has no training objective for it (its
        # forward returns codes and a reconstruction, no loss).
        self.is_training = False
        self.hidden_size = 16

    def get_config(self) -> DVAEConfig:
        return DVAEConfig(
            codebook_size=64, hidden_size=16, num_blocks_per_group=1, decoder_init_channels=8, image_size=32
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size], scale=1.0)
        return self.get_config(), {"pixel_values": pixel_values}


class DVAEModelTest(ImageModelTestMixin, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DVAEModel,)
    test_resize_embeddings = False
    has_attentions = False

    def setUp(self):
        self.model_tester = DVAEModelTester(self)
        # A convolutional model: no attention heads or transformer layers (transformers' own convolutional testers,
        # e.g. ResNet's, name their properties the same way).
        self.config_tester = ConfigTester(
            self,
            config_class=DVAEConfig,
            has_text_modality=False,
            common_properties=["hidden_size", "num_channels", "codebook_size"],
        )

    def test_hidden_states_output(self):
        # The mixin's version expects token sequences; the dVAE returns the encoder's feature maps, checked here as
        # transformers' ResNet tests check theirs: the input convolution's output, then one per group.
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        size, width = self.model_tester.image_size, self.model_tester.hidden_size
        expected = [(width, size, size), (width, size // 2, size // 2), (2 * width, size // 4, size // 4)]
        expected += [(4 * width, size // 8, size // 8), (8 * width, size // 8, size // 8)]
        for from_config in (False, True):
            config.output_hidden_states = from_config
            model = DVAEModel(copy.deepcopy(config)).eval()
            with torch.no_grad():
                kwargs = {} if from_config else {"output_hidden_states": True}
                hidden_states = model(**inputs_dict, **kwargs).hidden_states
            self.assertEqual([tuple(h.shape[1:]) for h in hidden_states], expected)
            self.assertIsNone(model(**inputs_dict, output_hidden_states=False).hidden_states)

    def test_config(self):
        self.config_tester.run_common_tests()


# --------------------------------------------------------------------------------------------------------------------
# VQKDPixelDecoder (VQ-KD codes -> pixels)
# --------------------------------------------------------------------------------------------------------------------


class VQKDPixelDecoderTester:
    def __init__(self, parent, batch_size: int = 3):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = 32
        self.patch_size = 8
        self.codebook_size = 64
        self.is_training = True
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.seq_length = (32 // 8) ** 2

    def get_config(self) -> VQKDPixelDecoderConfig:
        return VQKDPixelDecoderConfig(
            codebook_size=self.codebook_size,
            code_dim=8,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            refine_channels=8,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.codebook_size)
        return self.get_config(), {"input_ids": input_ids}


class VQKDPixelDecoderTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (VQKDPixelDecoder,)
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = VQKDPixelDecoderTester(self)
        self.config_tester = ConfigTester(self, config_class=VQKDPixelDecoderConfig, has_text_modality=False)

    def test_init_weights_can_init_buffers(self):
        # The mixin compares the buffers of two builds for equality, which holds for deterministic buffers only.
        with deterministic_codebook_draws():
            super().test_init_weights_can_init_buffers()

    # Its input embedding is the codebook lookup and projection of code ids, not a token `nn.Embedding`.
    test_model_get_set_embeddings = ImageModelTestMixin.test_model_get_set_embeddings

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            generator = torch.Generator().manual_seed(0)
            batch = inputs["input_ids"].shape[0]
            size = self.model_tester.image_size
            inputs["pixel_values"] = torch.rand((batch, 3, size, size), generator=generator)
        return inputs

    def test_config(self):
        self.config_tester.run_common_tests()
