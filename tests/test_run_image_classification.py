"""End-to-end fine-tuning with examples/run_image_classification.py on tiny models and generated images; the
exported classifier then runs in `pipeline("image-classification")` in a fresh process without this package."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BeitConfig, BeitForImageClassification, BeitModel

from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_image_classification.py"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=8)


def write_image_folders(root: Path, per_class: int = 4, size: int = 40) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                noise = rng.integers(-25, 26, size=(size, size, 3))
                pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root / "train", root / "validation"


def run_script(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def common_args(train_dir: Path, validation_dir: Path, output_dir: Path) -> list[str]:
    return [
        "--train_dir", str(train_dir), "--validation_dir", str(validation_dir), "--output_dir", str(output_dir),
        "--do_train", "--do_eval", "--max_steps", "4", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "6", "--learning_rate", "1e-3", "--layer_decay", "0.65",
        "--use_cpu", "--dataloader_num_workers", "0", "--save_strategy", "no", "--seed", "0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mim_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = BeitV2Config(**TINY, image_size=32, vocab_size=16, early_layers=2, head_layers=1)
    model = BeitV2ForMaskedImageModeling(config)
    # A recognisable shared table, to check that every exported layer starts from it.
    with torch.no_grad():
        model.beit.shared_position_bias.relative_position_bias_table.normal_()
    folder = tmp_path_factory.mktemp("mim")
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_fine_tune_mim_checkpoint_then_pipeline_in_a_fresh_process(tmp_path, mim_checkpoint):
    train_dir, validation_dir = write_image_folders(tmp_path / "data")
    output_dir = tmp_path / "out"
    run_script(
        "--model_name_or_path", str(mim_checkpoint), *common_args(train_dir, validation_dir, output_dir),
        "--mixup_alpha", "0.8", "--cutmix_alpha", "1.0", "--label_smoothing", "0.1", "--random_erasing", "0.25",
    )  # fmt: skip

    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    assert 0.0 <= eval_results["eval_accuracy"] <= 1.0
    assert "eval_top5_accuracy" not in eval_results  # 3 classes: top-5 would be trivially 1
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "beit" and config["architectures"] == ["BeitForImageClassification"]
    assert config["use_relative_position_bias"] and not config["use_shared_relative_position_bias"]
    assert config["use_mean_pooling"] and config["drop_path_rate"] == 0.1
    assert "auto_map" not in config
    assert sorted(config["id2label"].values()) == sorted(COLOURS)
    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"].startswith("BeitImageProcessor")
    assert processor["crop_size"] == {"height": 32, "width": 32}
    card = (output_dir / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "library_name: transformers" in card
    assert f"| eval_accuracy | {round(eval_results['eval_accuracy'], 4):.6g} |" in card
    assert "| layer_decay | 0.65 |" in card
    assert not list(output_dir.glob("*.py"))

    # The model card, weights and processor are all a fresh process needs; our packages must not be imported.
    probe = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("modeling_beitv2", "processing"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import json
        from PIL import Image
        from transformers import pipeline
        classifier = pipeline("image-classification", model={str(output_dir)!r}, device="cpu")
        predictions = classifier(Image.new("RGB", (50, 40), (200, 20, 20)), top_k=3)
        print(json.dumps(predictions))
        assert not any(name.split(".")[0] in ("modeling_beitv2", "processing") for name in sys.modules)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-4000:]
    predictions = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(predictions) == 3
    assert {prediction["label"] for prediction in predictions} == set(COLOURS)
    assert sum(prediction["score"] for prediction in predictions) == pytest.approx(1.0, abs=1e-4)


def test_fine_tune_native_beit_checkpoint_learns_colours(tmp_path):
    """A native shared-bias `beit` checkpoint fine-tunes at another resolution; without mixup the colour task is
    learned."""
    torch.manual_seed(0)
    config = BeitConfig(
        **TINY,
        image_size=32,
        use_shared_relative_position_bias=True,
        use_mean_pooling=False,
        layer_scale_init_value=0.1,
        layer_norm_eps=1e-6,
    )
    native = tmp_path / "native"
    BeitModel(config).save_pretrained(native)
    train_dir, validation_dir = write_image_folders(tmp_path / "data", per_class=8)
    output_dir = tmp_path / "out"
    args = common_args(train_dir, validation_dir, output_dir)
    args[args.index("--max_steps") + 1] = "30"
    run_script(
        "--model_name_or_path", str(native), *args, "--mixup_alpha", "0", "--cutmix_alpha", "0",
        "--rand_augment_num_ops", "0", "--random_erasing", "0", "--drop_path_rate", "0", "--head_init_scale", "1",
        "--image_size", "48",
    )  # fmt: skip
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    assert eval_results["eval_accuracy"] >= 0.9, eval_results

    model = BeitForImageClassification.from_pretrained(output_dir)
    assert model.config.image_size == 48
    tables = [layer.relative_position_bias.relative_position_bias_table for layer in model.beit.layers]
    assert tables[0].shape == ((2 * 6 - 1) ** 2 + 3, 2)  # resized from the 4x4 grid's table to a 6x6 grid
    # All layers started from one shared table, and per-layer training made them differ.
    assert not torch.equal(tables[0], tables[-1])


def test_rejects_a_checkpoint_that_is_not_beit(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path / "vit")
    sys.path.insert(0, str(ROOT / "examples"))
    from finetuning.trainer import load_native_beit

    with pytest.raises(ValueError, match="model_type 'vit'"):
        load_native_beit(str(tmp_path / "vit"))


@pytest.mark.slow
def test_streaming_run_resumes_from_its_last_checkpoint(tmp_path, mim_checkpoint):
    train_dir, validation_dir = write_image_folders(tmp_path / "data", per_class=2)
    output_dir = tmp_path / "out"
    args = common_args(train_dir, validation_dir, output_dir)
    args[args.index("--save_strategy") + 1] = "steps"
    stream = ["--model_name_or_path", str(mim_checkpoint), "--streaming", "--save_steps", "2", "--mixup_alpha", "0"]
    args[args.index("--max_steps") + 1] = "2"
    run_script(*stream, *args)
    assert (output_dir / "checkpoint-2").is_dir()

    args[args.index("--max_steps") + 1] = "3"
    result = run_script(*stream, *args)
    assert f"Loading model from {output_dir / 'checkpoint-2'}" in result.stderr + result.stdout
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert 0.0 <= json.loads((output_dir / "eval_results.json").read_text())["eval_accuracy"] <= 1.0


@pytest.mark.parametrize("streaming", [True, False])
def test_unreadable_images_are_skipped_and_logged(tmp_path, mim_checkpoint, streaming):
    train_dir, validation_dir = write_image_folders(tmp_path / "data", per_class=2)
    (train_dir / "red" / "truncated.png").write_bytes((train_dir / "red" / "0.png").read_bytes()[:60])
    (validation_dir / "blue" / "empty.png").write_bytes(b"")
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(train_dir / "red" / "cmyk.jpg")  # converted, not skipped
    output_dir = tmp_path / "out"
    args = common_args(train_dir, validation_dir, output_dir)
    args[args.index("--max_steps") + 1] = "3"
    extra = ["--streaming"] if streaming else []
    result = run_script("--model_name_or_path", str(mim_checkpoint), "--mixup_alpha", "0", *extra, *args)
    log = result.stderr + result.stdout
    assert "truncated.png: unreadable" in log and "empty.png" in log
    assert "cmyk.jpg" not in log
    evaluation = json.loads((output_dir / "eval_results.json").read_text())
    assert 0.0 <= evaluation["eval_accuracy"] <= 1.0


def test_logged_loss_is_the_mean_cross_entropy_with_and_without_accumulation(tmp_path):
    """Soft (mixup) and hard labels, 1 batch of 4 or 2 accumulated batches of 2: the same mean loss."""
    from transformers import TrainingArguments, default_data_collator

    from finetuning.trainer import LayerDecayTrainer

    torch.manual_seed(0)
    model = BeitForImageClassification(BeitConfig(**TINY, image_size=32, num_labels=10, drop_path_rate=0.0))
    pixel_values = torch.randn(4, 3, 32, 32)
    soft_labels = torch.softmax(torch.randn(4, 10), dim=-1)
    hard_labels = torch.tensor([1, 4, 7, 9])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(pixel_values).logits, dim=-1)
    expected = {
        "soft": -(soft_labels * log_probs).sum(-1).mean().item(),
        "hard": torch.nn.functional.nll_loss(log_probs, hard_labels).item(),
    }
    for kind, labels in (("soft", soft_labels), ("hard", hard_labels)):
        dataset = [{"pixel_values": p, "labels": label} for p, label in zip(pixel_values, labels)]
        for batch_size, accumulation in ((4, 1), (2, 2)):
            args = TrainingArguments(
                output_dir=str(tmp_path / f"{kind}{batch_size}"),
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
                learning_rate=0.0,
                logging_steps=1,
                use_cpu=True,
                report_to="none",
                save_strategy="no",
            )
            trainer = LayerDecayTrainer(
                model=model, args=args, train_dataset=dataset, data_collator=default_data_collator, layer_decay=0.65
            )
            trainer.train()
            logged = trainer.state.log_history[0]["loss"]
            assert logged == pytest.approx(expected[kind], abs=1e-3), (kind, batch_size, accumulation)


def test_recipe_sets_the_augmentation_defaults_and_each_flag_overrides_it():
    from run_image_classification import RECIPES, DataArguments

    from pretraining.arguments import parse_arguments

    def parse(*args: str) -> DataArguments:
        (data_args,) = parse_arguments((DataArguments,), args=list(args))
        return data_args

    simple = parse()
    assert simple.recipe == "simple"
    assert (simple.rand_augment_num_ops, simple.random_erasing, simple.mixup_alpha) == (0, 0.0, 0.0)
    assert (simple.cutmix_alpha, simple.label_smoothing) == (0.0, 0.0)
    paper = parse("--recipe", "paper", "--mixup_alpha", "0.2")
    assert paper.mixup_alpha == 0.2  # the flag wins over the recipe
    assert {name: getattr(paper, name) for name in RECIPES["paper"] if name != "mixup_alpha"} == {
        "rand_augment_num_ops": 2,
        "random_erasing": 0.25,
        "cutmix_alpha": 1.0,
        "label_smoothing": 0.1,
    }
    with pytest.raises(ValueError, match="random_erasing is a probability"):
        parse("--random_erasing", "1.5")
    with pytest.raises(ValueError, match=r"--train_val_split must be in \[0, 1\)"):
        parse("--train_val_split", "1")


@pytest.mark.slow
def test_train_dir_alone_holds_out_an_evaluation_split(tmp_path, mim_checkpoint):
    """The issue's bare `KeyError: 'validation'`: with --train_dir only, --do_eval evaluates on a seeded 15%."""
    train_dir, _ = write_image_folders(tmp_path / "data", per_class=4)  # 12 training images
    output_dir = tmp_path / "out"
    args = common_args(train_dir, tmp_path / "unused", output_dir)
    del args[args.index("--validation_dir") : args.index("--validation_dir") + 2]
    args[args.index("--max_steps") + 1] = "1"
    result = run_script("--model_name_or_path", str(mim_checkpoint), *args)
    log = result.stderr + result.stdout
    assert "No 'validation' split: holding out 0.15 of 'train'" in log
    assert "Num examples = 2" in log  # ceil(0.15 * 12) held-out images evaluated
    assert "falling back to" not in log  # the PIL processor is built explicitly, not as a fallback
    assert 0.0 <= json.loads((output_dir / "eval_results.json").read_text())["eval_accuracy"] <= 1.0


def run_main_in_process(monkeypatch, *args: str) -> None:
    import run_image_classification

    monkeypatch.setattr(sys, "argv", ["run_image_classification.py", *args])
    run_image_classification.main()


def test_a_missing_tracker_stops_the_script_before_loading_anything(tmp_path, monkeypatch):
    import finetuning.trainer as fine_tuning

    monkeypatch.setattr(fine_tuning, "get_available_reporting_integrations", lambda: [])
    # A model and data that do not exist: were the check late, loading them would fail first.
    with pytest.raises(SystemExit, match=r"--report_to tensorboard: .*\.\[tensorboard\]"):
        run_main_in_process(
            monkeypatch, "--model_name_or_path", str(tmp_path / "no-model"), "--train_dir", str(tmp_path / "no-data"),
            "--output_dir", str(tmp_path / "out"), "--do_train", "--report_to", "tensorboard", "--use_cpu",
        )  # fmt: skip


def test_push_to_hub_offline_stops_the_script_before_loading_anything(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match="--push_to_hub: cannot use the Hub repo 'out'"):
        run_main_in_process(
            monkeypatch, "--model_name_or_path", str(tmp_path / "no-model"), "--train_dir", str(tmp_path / "no-data"),
            "--output_dir", str(tmp_path / "out"), "--do_train", "--push_to_hub", "--hub_token", "hf_not_a_token",
            "--report_to", "none", "--use_cpu",
        )  # fmt: skip
