"""The Trainer side of the fine-tuning scripts (fine_tuning.py): the shared model flags, the pixel normalisation of
training views, the Trainer with its collators and model card, and the checks at start. (Normalisation and
evaluation processors are tested with their one factory, in test_evaluation_processing.py.)"""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import BeitConfig, BeitForImageClassification, TrainingArguments

from finetuning.trainer import SkipUnreadableImages, check_trainer_start, fine_tuning_trainer, pixel_normaliser
from pretraining.arguments import parse_arguments


def test_each_trainer_script_declares_the_shared_model_flags_with_its_own_layer_decay():
    """The model flags of the two Trainer scripts come from one dataclass (`FineTuningModelArguments`); each script
    keeps its own layer-decay default (the segmentation recipe always decays)."""
    import run_image_classification
    import run_semantic_segmentation

    for module, layer_decay in ((run_image_classification, None), (run_semantic_segmentation, 0.75)):
        (model_args,) = parse_arguments((module.ModelArguments,), args=["--model_name_or_path", "m"])
        assert (model_args.layer_decay, model_args.drop_path_rate, model_args.license) == (layer_decay, 0.1, None)


def test_pixel_normaliser_rescales_and_normalises_with_the_processor_statistics():
    class Statistics:  # what the normaliser reads of an image processor
        image_mean = [0.5, 0.25, 0.0]
        image_std = [0.5, 0.25, 2.0]

    image = PIL.Image.new("RGB", (3, 2), (255, 0, 51))
    pixels = pixel_normaliser(Statistics())(image)
    assert pixels.shape == (3, 2, 3) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[:, 0, 0], [1.0, -1.0, 0.1], rtol=1e-6)


def test_fine_tuning_trainer_cards_the_shared_settings_and_skips_unreadable_images(tmp_path):
    import run_image_classification

    source = tmp_path / "native"
    BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64).save_pretrained(
        source
    )
    (model_args,) = parse_arguments(
        (run_image_classification.ModelArguments,),
        args=["--model_name_or_path", str(source), "--layer_decay", "0.65", "--license", "mit"],
    )
    (data_args,) = parse_arguments((run_image_classification.DataArguments,), args=["--dataset_name", "someone/data"])
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=7,
        report_to=[],
        use_cpu=True,
    )

    def mix(features: list[dict]) -> dict:
        return {"count": len(features)}

    trainer = fine_tuning_trainer(
        BeitForImageClassification(BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)),
        training_args,
        model_name_or_path=model_args.model_name_or_path,
        dataset_name=data_args.dataset_name,
        layer_decay=model_args.layer_decay,
        drop_path_rate=model_args.drop_path_rate,
        license=model_args.license,
        train_dataset=None,
        eval_dataset=None,
        image_processor=None,
        compute_metrics=None,
        card_kind="classifier",
        card_settings={"recipe": "simple"},
        train_data_collator=mix,
    )
    assert trainer.layer_decay == 0.65 and trainer.model_card["kind"] == "classifier"
    assert trainer.model_card["license"] == "mit" and trainer.model_card["datasets"] == ["someone/data"]
    assert trainer.model_card["training_args"] == {
        "learning_rate": training_args.learning_rate,
        "global_batch_size": 8,
        "max_steps": 7,
        "weight_decay": 0.0,
        "layer_decay": 0.65,
        "drop_path_rate": 0.1,
        "recipe": "simple",
    }
    readable, unreadable = {"pixel_values": torch.zeros(3)}, {"pixel_values": None}
    for collator in (trainer.data_collator, trainer.train_data_collator):
        assert isinstance(collator, SkipUnreadableImages)
    assert trainer.train_data_collator([readable, unreadable, readable]) == {"count": 2}


def test_a_missing_tracker_stops_the_start_with_the_extra_to_install(tmp_path, monkeypatch):
    import finetuning.trainer as fine_tuning

    start = {"push_to_hub": False, "hub_model_id": None, "output_dir": str(tmp_path), "token": None}
    check_trainer_start(["tensorboard"], **start)  # installed here
    monkeypatch.setattr(fine_tuning, "get_available_reporting_integrations", lambda: ["wandb"])
    with pytest.raises(SystemExit, match=r'--report_to tensorboard: .* pip install -e "\.\[tensorboard\]"') as error:
        check_trainer_start(["tensorboard"], **start)
    assert "\n" not in str(error.value)


def test_push_to_hub_offline_stops_the_start_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match="--push_to_hub: cannot use the Hub repo 'my-model'.*offline") as error:
        check_trainer_start([], True, None, str(tmp_path / "my-model"), "hf_not_a_token")
    assert "\n" not in str(error.value)
