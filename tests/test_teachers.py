from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTModel,
)

from modeling_beitv2 import TeacherForPatchTargets, VQKDConfig
from modeling_beitv2.teachers import IMAGENET_MEAN, IMAGENET_STD

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32)


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_clip_teacher_projects_post_layernormed_patch_tokens(tmp_path, pixels):
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY, patch_size=8, projection_dim=24)).eval()
    clip.save_pretrained(tmp_path)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    CLIPImageProcessor(image_mean=list(mean), image_std=list(std)).save_pretrained(tmp_path)

    teacher = TeacherForPatchTargets.from_pretrained(str(tmp_path)).train()
    targets = teacher(pixels)
    assert targets.shape == (2, 16, 24) and not targets.requires_grad
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())

    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = clip.vision_model(pixel_values=normalised).last_hidden_state
        expected = clip.visual_projection(clip.vision_model.post_layernorm(tokens))[:, 1:]
    torch.testing.assert_close(targets, expected)
    assert teacher.feature_dim == 24 and teacher.patch_grid(32) == (4, 4)


def test_vit_teacher_without_processor_uses_imagenet_normalisation(tmp_path, pixels):
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(**TINY, patch_size=8), add_pooling_layer=False).eval()
    vit.save_pretrained(tmp_path)
    teacher = TeacherForPatchTargets.from_pretrained(str(tmp_path))
    normalised = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = vit(pixel_values=normalised).last_hidden_state[:, 1:]
    torch.testing.assert_close(teacher(pixels), expected)
    assert teacher.feature_dim == 32


def test_dinov2_teacher_drops_register_tokens(pixels):
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(**TINY, patch_size=8, num_register_tokens=4)
    teacher = TeacherForPatchTargets(Dinov2WithRegistersModel(config), IMAGENET_MEAN, IMAGENET_STD)
    assert teacher(pixels).shape == (2, 16, 32)
    assert teacher.num_prefix_tokens == 5


def test_check_compatible_names_both_values():
    teacher = TeacherForPatchTargets(ViTModel(ViTConfig(**TINY, patch_size=8)), IMAGENET_MEAN, IMAGENET_STD)
    config = VQKDConfig.from_preset("tiny-decoder1", image_size=224)
    with pytest.raises(ValueError, match=r"feature size is 32 but the tokenizer's teacher_dim is 512"):
        teacher.check_compatible(config, image_size=224)
    config = VQKDConfig.from_preset("tiny-decoder1", image_size=224, teacher_dim=32)
    with pytest.raises(ValueError, match=r"patch grid is \(28, 28\).*tokenizer's is \(14, 14\)"):
        teacher.check_compatible(config, image_size=224)


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_teacher_interpolates_position_embeddings_to_other_resolutions(kind, pixels):
    # The teacher is built at 32 px; the tokenizer may train at another resolution (here 48 px, a 6x6 grid).
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY, patch_size=8, projection_dim=24)).eval()
        backbone = model.vision_model
    else:
        model = backbone = ViTModel(ViTConfig(**TINY, patch_size=8), add_pooling_layer=False).eval()
    teacher = TeacherForPatchTargets(model, IMAGENET_MEAN, IMAGENET_STD)
    feature_dim = 24 if kind == "clip" else 32

    large = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    targets = teacher(large)
    assert targets.shape == (2, 36, feature_dim) and torch.isfinite(targets).all()
    normalised = (large - teacher.image_mean) / teacher.image_std
    with pytest.raises(ValueError, match="doesn't match model"):
        backbone(pixel_values=normalised)

    # at the native size interpolation is the identity: the same targets as the uninterpolated model
    normalised = (pixels - teacher.image_mean) / teacher.image_std
    with torch.no_grad():
        tokens = backbone(pixel_values=normalised).last_hidden_state
        if kind == "clip":
            tokens = model.visual_projection(model.vision_model.post_layernorm(tokens))
    torch.testing.assert_close(teacher(pixels), tokens[:, 1:], rtol=0, atol=0)


def test_dinov2_teacher_at_another_resolution():
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(**TINY, patch_size=8, num_register_tokens=4)
    teacher = TeacherForPatchTargets(Dinov2WithRegistersModel(config), IMAGENET_MEAN, IMAGENET_STD)
    assert teacher(torch.rand(2, 3, 48, 48)).shape == (2, 36, 32)


def test_check_compatible_at_another_resolution_than_the_teachers():
    teacher = TeacherForPatchTargets(ViTModel(ViTConfig(**TINY, patch_size=8)), IMAGENET_MEAN, IMAGENET_STD)
    config = VQKDConfig(
        encoder_config=dict(TINY, image_size=48, patch_size=8),
        decoder_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        code_dim=8,
        teacher_dim=32,
    )
    teacher.check_compatible(config, image_size=48)  # the teacher's 32 px does not matter
    with pytest.raises(ValueError, match="image_size 50 is not a multiple of the teacher's patch size 8"):
        teacher.check_compatible(config, image_size=50)


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_teacher_runs_in_half_precision_under_autocast_and_compiles(kind, pixels):
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY, patch_size=8, projection_dim=24))
        first_query = model.vision_model.encoder.layers[0].self_attn.q_proj
    else:
        model = ViTModel(ViTConfig(**TINY, patch_size=8), add_pooling_layer=False)
        first_query = model.layers[0].attention.q_proj
    teacher = TeacherForPatchTargets(model, IMAGENET_MEAN, IMAGENET_STD)
    expected = teacher(pixels)
    query_dtypes = []
    first_query.register_forward_hook(lambda module, args, output: query_dtypes.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        targets = teacher(pixels)
    # Nothing in the teacher forces fp32: its matmuls (and on a GPU its SDPA attention) run in bf16.
    assert query_dtypes == [torch.bfloat16]
    torch.testing.assert_close(targets.float(), expected, rtol=0.05, atol=0.05)
    # A teacher loaded in bf16 takes fp32 images as they come from the data pipeline.
    half_teacher = TeacherForPatchTargets(model.to(torch.bfloat16), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(half_teacher(pixels).float(), expected, rtol=0.05, atol=0.05)
    torch._dynamo.reset()
    compiled = torch.compile(teacher, backend="aot_eager")
    torch.testing.assert_close(compiled(pixels), teacher(pixels), rtol=1e-5, atol=1e-5)


def test_where_to_read_from_applies_to_config_and_normalisation_too(tmp_path):
    """`subfolder` (like `revision`, `token`, `cache_dir`) reaches the config and the saved statistics, not only the
    weights: a teacher published inside a subfolder keeps its own normalisation."""
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(**TINY, patch_size=8), add_pooling_layer=False).eval()
    vit.save_pretrained(tmp_path / "teacher")
    CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path / "teacher")
    teacher = TeacherForPatchTargets.from_pretrained(str(tmp_path), subfolder="teacher")
    assert teacher.image_mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert teacher.image_std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
