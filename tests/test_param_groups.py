"""Parameter groups for fine-tuning: weight-decay exclusions and layer-wise lr decay, checked against the formula
lr = base_lr * decay ** (L + 1 - layer_id), with the layer ids written out independently of the helper."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import BeitConfig, BeitForImageClassification, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from finetuning.param_groups import layer_decay_param_groups  # noqa: E402

NUM_LAYERS = 4
BASE_LR = 3e-3
DECAY = 0.65


def tiny_classifier() -> BeitForImageClassification:
    config = BeitConfig(
        hidden_size=32,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        use_relative_position_bias=True,
        use_mean_pooling=True,
        layer_scale_init_value=0.1,
        num_labels=5,
    )
    return BeitForImageClassification(config)


def expected_layer_id(name: str) -> int:
    parts = name.split(".")
    if parts[:2] == ["beit", "embeddings"]:
        return 0
    if parts[:2] == ["beit", "layers"]:
        return int(parts[2]) + 1
    # Pooler LayerNorm and classifier sit above the last block.
    return NUM_LAYERS + 1


def expected_weight_decay(name: str, param: torch.Tensor) -> float:
    no_decay = param.ndim == 1 or name.endswith("bias") or name.endswith("cls_token")
    return 0.0 if no_decay else 0.05


def test_every_group_lr_equals_layer_decay_formula():
    model = tiny_classifier()
    groups = layer_decay_param_groups(
        model, weight_decay=0.05, learning_rate=BASE_LR, layer_decay=DECAY, num_layers=NUM_LAYERS
    )
    parameters = dict(model.named_parameters())
    seen = []
    for group in groups:
        assert len(group["params"]) == len(group["names"])
        for name, param in zip(group["names"], group["params"]):
            assert param is parameters[name]
            assert group["lr"] == BASE_LR * DECAY ** (NUM_LAYERS + 1 - expected_layer_id(name)), name
            assert group["weight_decay"] == expected_weight_decay(name, param), name
            seen.append(name)
    assert sorted(seen) == sorted(parameters)
    # Groups are split by (layer, decay): embeddings, 4 blocks, top; each with and without weight decay.
    assert len(groups) == 2 * (NUM_LAYERS + 2)
    lrs = sorted({group["lr"] for group in groups})
    assert lrs[0] == BASE_LR * DECAY ** (NUM_LAYERS + 1) and lrs[-1] == BASE_LR
    head_group = next(group for group in groups if "classifier.weight" in group["names"])
    assert head_group["lr"] == BASE_LR and head_group["weight_decay"] == 0.05


def test_without_layer_decay_every_group_has_the_base_lr():
    groups = layer_decay_param_groups(tiny_classifier(), weight_decay=0.05, learning_rate=BASE_LR)
    assert len(groups) == 2
    assert all(group["lr"] == BASE_LR for group in groups)


def test_layer_decay_needs_num_layers():
    with pytest.raises(ValueError, match="num_layers"):
        layer_decay_param_groups(tiny_classifier(), weight_decay=0.05, learning_rate=BASE_LR, layer_decay=0.65)


def test_frozen_parameters_are_left_out():
    model = tiny_classifier()
    model.beit.requires_grad_(False)
    groups = layer_decay_param_groups(
        model, weight_decay=0.05, learning_rate=BASE_LR, layer_decay=DECAY, num_layers=NUM_LAYERS
    )
    assert sorted(name for group in groups for name in group["names"]) == ["classifier.bias", "classifier.weight"]


def test_trainer_optimizer_keeps_the_groups_and_the_scheduler_scales_them(tmp_path):
    """The fine-tuning script's Trainer builds exactly these groups, and the lr schedule multiplies every group's
    initial lr by the same factor, so the ratio between layers holds at every step."""
    from finetuning.trainer import LayerDecayTrainer

    model = tiny_classifier()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=BASE_LR,
        weight_decay=0.05,
        warmup_steps=2,
        max_steps=10,
        lr_scheduler_type="cosine",
        use_cpu=True,
    )
    trainer = LayerDecayTrainer(model=model, args=args, layer_decay=DECAY)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    names_by_param = {id(param): name for name, param in model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        assert "names" not in group
        for param in group["params"]:
            layer_id = expected_layer_id(names_by_param[id(param)])
            assert group["initial_lr"] == BASE_LR * DECAY ** (NUM_LAYERS + 1 - layer_id)
    for _ in range(3):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    factor = trainer.lr_scheduler.get_last_lr()[0] / trainer.optimizer.param_groups[0]["initial_lr"]
    assert 0 < factor < 1
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * factor, rel=1e-12)
