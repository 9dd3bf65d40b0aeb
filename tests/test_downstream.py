"""The model a stage-3 script starts from (downstream.py): the native `beit` export, which transformers' own
fine-tuning starts from without this package; and the rule that the example scripts share code through helper
modules, never by importing one another."""

import ast
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import run_without_package
from transformers import AutoModelForImageClassification

from finetuning.trainer import export_native_checkpoint
from modeling_beitv2 import BeitV2Config, BeitV2ForMaskedImageModeling


def test_no_example_script_imports_another_script():
    """Scripts (files with a `__main__` block) share code through the helper packages (pretraining/, finetuning/,
    demo_pipeline/): importing a script runs its module-level setup and ties the scripts' command lines together."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    trees = {str(path.relative_to(examples)): ast.parse(path.read_text()) for path in examples.rglob("*.py")}
    scripts = {
        name.removesuffix(".py") for name, tree in trees.items() if "/" not in name and "__main__" in ast.unparse(tree)
    }
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
