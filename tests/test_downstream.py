"""What the stage-3 scripts share through downstream.py: the argument dataclasses, the evaluation hold-out and
truncation, the pixel normalisation of training views, the Trainer of the fine-tuning scripts, the checks at start,
the native export; and the rule that scripts import helpers, never one another. (Normalisation and evaluation processors are
tested with their one factory, in test_evaluation_processing.py.)"""

import ast
import io
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import run_without_package
from downstream import (
    ClassificationDataArguments,
    LabelledDataArguments,
    SkipUnreadableImages,
    check_trainer_start,
    export_native_checkpoint,
    fine_tuning_trainer,
    first_examples,
    load_image_classification_data,
    pixel_normaliser,
    prepare_splits,
)
from pretraining_arguments import parse_arguments
from transformers import AutoModelForImageClassification, BeitConfig, BeitForImageClassification, TrainingArguments

from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling


def test_no_example_script_imports_another_script():
    """Scripts (files with a `__main__` block) share code through helper modules such as downstream.py: importing
    a script runs its module-level setup and ties the scripts' command lines together."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    trees = {path.stem: ast.parse(path.read_text()) for path in examples.glob("*.py")}
    scripts = {name for name, tree in trees.items() if "__main__" in ast.unparse(tree)}
    assert {"run_image_classification", "run_semantic_segmentation"} <= scripts
    imported = {
        (name, module)
        for name, tree in trees.items()
        for node in ast.walk(tree)
        for module in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.level == 0
            else []
        )
        if module.split(".")[0] in scripts
    }
    assert imported == set()


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_prepare_splits_holds_out_a_seeded_part_of_the_training_split():
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"index": list(range(40))})})
    data_args = LabelledDataArguments(train_val_split=0.25)
    split = prepare_splits(raw, data_args, seed=3, do_train=True, do_eval=True)
    train, held_out = list(split["train"]["index"]), list(split["validation"]["index"])
    assert len(held_out) == 10 and sorted(train + held_out) == list(range(40))
    # The same seed holds out the same examples (a --do_eval-only run later evaluates on what training never saw).
    again = prepare_splits(raw, data_args, seed=3, do_train=False, do_eval=True)
    assert list(again["validation"]["index"]) == held_out
    other_seed = prepare_splits(raw, data_args, seed=4, do_train=True, do_eval=True)
    assert list(other_seed["validation"]["index"]) != held_out
    # Nothing is held out when there is an evaluation split or no evaluation.
    assert prepare_splits(split, data_args, seed=3, do_train=True, do_eval=True) is split
    assert prepare_splits(raw, data_args, seed=3, do_train=True, do_eval=False) is raw
    # The split names come from the arguments too.
    renamed = prepare_splits(
        datasets.DatasetDict({"fit": raw["train"]}),
        LabelledDataArguments(train_split="fit", validation_split="dev", train_val_split=0.25),
        seed=3,
        do_train=True,
        do_eval=True,
    )
    assert set(renamed) == {"fit", "dev"} and list(renamed["dev"]["index"]) == held_out


def test_prepare_splits_holds_out_part_of_a_stream_by_image_hash():
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})

    def rows():
        for index in range(60):
            yield {"image": {"bytes": png_bytes(index), "path": None}, "label": index}

    raw = datasets.IterableDatasetDict({"train": datasets.IterableDataset.from_generator(rows, features=features)})
    data_args = LabelledDataArguments(train_val_split=0.3)
    split = prepare_splits(raw, data_args, seed=0, do_train=True, do_eval=True, image_column="image")
    assert isinstance(split, datasets.IterableDatasetDict)
    train = [row["label"] for row in split["train"]]
    held_out = [row["label"] for row in split["validation"]]
    assert sorted(train + held_out) == list(range(60))
    assert 5 <= len(held_out) <= 35  # a binomial draw around 18


def test_prepare_splits_names_the_missing_split_and_the_flags_that_give_one():
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"index": [0, 1, 2]})})
    with pytest.raises(ValueError, match=r"split 'validation'.*\['train'\].*--validation_dir.*--train_val_split"):
        prepare_splits(raw, LabelledDataArguments(train_val_split=0.0), seed=0, do_train=True, do_eval=True)
    with pytest.raises(ValueError, match="no training split 'training'.*--train_split"):
        prepare_splits(raw, LabelledDataArguments(train_split="training"), seed=0, do_train=True, do_eval=False)
    with pytest.raises(ValueError, match=r"--train_val_split must be in \[0, 1\)"):
        LabelledDataArguments(train_val_split=1.0)
    data_args = LabelledDataArguments()
    data_args.train_val_split = 1.0  # set after the dataclass checked it
    with pytest.raises(ValueError, match=r"--train_val_split must be in \[0, 1\)"):
        prepare_splits(raw, data_args, seed=0, do_train=True, do_eval=True)


def test_every_script_declares_the_shared_flags_once_with_their_check():
    """The data flags of the three scripts and the model flags of the two Trainer scripts come from one dataclass
    each (`LabelledDataArguments`, `ClassificationDataArguments`, `FineTuningModelArguments`): the same names, the
    same defaults and the same `--train_val_split` check everywhere."""
    import run_image_classification
    import run_linear_probe
    import run_semantic_segmentation

    required = {
        run_image_classification.DataArguments: [],
        run_semantic_segmentation.DataArguments: [],
        run_linear_probe.ProbeArguments: ["--model_name_or_path", "m", "--output_dir", "out"],
    }
    for dataclass_type, flags in required.items():
        (args,) = parse_arguments((dataclass_type,), args=[*flags, "--dataset_name", "d", "--max_eval_samples", "5"])
        assert isinstance(args, LabelledDataArguments)
        assert (args.dataset_name, args.train_split, args.validation_split) == ("d", "train", "validation")
        assert (args.train_val_split, args.max_eval_samples) == (0.15, 5)
        with pytest.raises(ValueError, match=r"--train_val_split must be in \[0, 1\)"):
            parse_arguments((dataclass_type,), args=[*flags, "--train_val_split", "1"])
    # Each Trainer script keeps its own layer-decay default (the segmentation recipe always decays).
    for module, layer_decay in ((run_image_classification, None), (run_semantic_segmentation, 0.75)):
        (model_args,) = parse_arguments((module.ModelArguments,), args=["--model_name_or_path", "m"])
        assert (model_args.layer_decay, model_args.drop_path_rate, model_args.license) == (layer_decay, 0.1, None)


def test_class_folders_load_as_the_named_splits(tmp_path):
    for split, colour in (("train", "red"), ("train", "blue"), ("val", "red")):
        (tmp_path / split / colour).mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (4, 4), colour).save(tmp_path / split / colour / "0.png")
    data_args = ClassificationDataArguments(
        train_dir=str(tmp_path / "train"),
        validation_dir=str(tmp_path / "val"),
        train_split="fit",
        validation_split="dev",
    )
    raw = load_image_classification_data(data_args, cache_dir=str(tmp_path / "cache"))
    assert {name: len(split) for name, split in raw.items()} == {"fit": 2, "dev": 1}
    with pytest.raises(ValueError, match="Pass --dataset_name, or --train_dir and/or --validation_dir"):
        load_image_classification_data(ClassificationDataArguments())


def test_first_examples_truncates_in_memory_and_streamed_splits():
    split = datasets.Dataset.from_dict({"index": list(range(5))})
    assert first_examples(split, None) is split
    assert first_examples(split, 3)["index"] == [0, 1, 2]
    assert first_examples(split, 10)["index"] == list(range(5))
    stream = split.to_iterable_dataset()
    assert [row["index"] for row in first_examples(stream, 2)] == [0, 1]
    assert [row["index"] for row in first_examples(stream, 10)] == list(range(5))


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
        model_args,
        data_args,
        training_args,
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
    import downstream

    args = TrainingArguments(output_dir=str(tmp_path), report_to="tensorboard")
    check_trainer_start(args)  # installed here
    monkeypatch.setattr(downstream, "get_available_reporting_integrations", lambda: ["wandb"])
    with pytest.raises(SystemExit, match=r'--report_to tensorboard: .* pip install -e "\.\[tensorboard\]"') as error:
        check_trainer_start(args)
    assert "\n" not in str(error.value)


def test_push_to_hub_offline_stops_the_start_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = TrainingArguments(
        output_dir=str(tmp_path / "my-model"), push_to_hub=True, hub_token="hf_not_a_token", report_to="none"
    )
    with pytest.raises(SystemExit, match="--push_to_hub: cannot use the Hub repo 'my-model'.*offline") as error:
        check_trainer_start(args)
    assert "\n" not in str(error.value)


TINY_MIM = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    patch_size=8,
    image_size=32,
    vocab_size=16,
    early_layers=1,
    head_layers=1,
)


def test_a_mim_checkpoint_loaded_as_a_classifier_names_the_native_export(tmp_path):
    BeitV2ForMaskedImageModeling(BeitV2Config(**TINY_MIM)).save_pretrained(tmp_path / "mim")
    with pytest.raises(ValueError, match="convert_mim_to_native_beit") as error:
        AutoModelForImageClassification.from_pretrained(tmp_path / "mim", num_labels=3)
    assert "examples/run_image_classification.py" in str(error.value)
    assert str(tmp_path / "mim") in str(error.value)


def test_native_export_starts_transformers_own_fine_tuning_without_this_package(tmp_path):
    """What transformers' run_image_classification.py does with a model path: AutoImageProcessor, then
    AutoModelForImageClassification with the dataset's labels and ignore_mismatched_sizes, here with our packages
    blocked."""
    torch.manual_seed(0)
    BeitV2ForMaskedImageModeling(BeitV2Config(**TINY_MIM)).save_pretrained(tmp_path / "mim")
    exported = export_native_checkpoint(str(tmp_path / "mim"), str(tmp_path / "native"))
    assert exported.config.model_type == "beit"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(tmp_path / "image.png")
    with torch.no_grad():
        expected = exported.beit(**{"pixel_values": torch.zeros(1, 3, 32, 32)}).pooler_output
    np.save(tmp_path / "expected.npy", expected.numpy())
    result = run_without_package(
        f"""
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        processor = AutoImageProcessor.from_pretrained({str(tmp_path / "native")!r})
        model = AutoModelForImageClassification.from_pretrained(
            {str(tmp_path / "native")!r}, num_labels=5, id2label={{i: str(i) for i in range(5)}},
            label2id={{str(i): i for i in range(5)}}, ignore_mismatched_sizes=True,
        ).eval()
        inputs = processor(Image.open({str(tmp_path / "image.png")!r}), return_tensors="pt")
        print(type(processor).__name__, tuple(inputs["pixel_values"].shape), tuple(model(**inputs).logits.shape))
        with torch.no_grad():
            pooled = model.beit(pixel_values=torch.zeros(1, 3, 32, 32)).pooler_output
        np.testing.assert_allclose(pooled.numpy(), np.load({str(tmp_path / "expected.npy")!r}), atol=1e-5)
        """,
        cwd=tmp_path,
    )
    assert result.stdout.split() == ["BeitImageProcessorPil", "(1,", "3,", "32,", "32)", "(1,", "5)"]
