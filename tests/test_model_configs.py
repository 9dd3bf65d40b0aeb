"""Configs from the command line (examples/pretraining/arguments.py, with run_mim.py's `mim_config` and run_vqkd.py's
`vqkd_config`): typed, validated overrides, presets or loadable config names, and what --model_name_or_path may
change."""

from __future__ import annotations

import re

import pytest
import torch
from run_mim import mim_config
from run_vqkd import vqkd_config
from transformers import AutoConfig

from modeling_beitv2 import BEITV2_PRESETS, BeitV2Config, BeitV2ForMaskedImageModeling, VQKDConfig, VQKDModel
from pretraining.arguments import parse_config_overrides, pretrained_config_updates, rebuild_config

TINY_MIM = "hidden_size=32,num_hidden_layers=4,num_attention_heads=4,intermediate_size=64,patch_size=8,early_layers=2"
TINY_VQKD = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,codebook_size=16,code_dim=8"


def tiny_mim(config_name: str = "tiny", **kwargs) -> BeitV2Config:
    """`mim_config` with the tiny test model's arguments, `kwargs` replacing some."""
    settings = dict(
        image_size=32, vocab_size=64, overrides=TINY_MIM, drop_path_rate=None, beit_v1=False, hub_kwargs={}
    )
    return mim_config(config_name, **{**settings, **kwargs})


def tiny_vqkd(config_name: str = "tiny", **kwargs) -> VQKDConfig:
    """`vqkd_config` with the tiny test tokenizer's arguments, `kwargs` replacing some."""
    settings = dict(image_size=32, teacher_patch_size=8, teacher_dim=16, overrides=TINY_VQKD, hub_kwargs={})
    return vqkd_config(config_name, **{**settings, **kwargs})


# --- parsing -----------------------------------------------------------------------------------------------------


def test_values_take_the_type_of_the_attribute_they_replace():
    config = BeitV2Config()
    parsed = parse_config_overrides(
        "hidden_size=32, use_mask_token=0,shared_lm_head=TRUE,layer_norm_eps=1e-5,drop_path_rate=1,hidden_act=gelu_new",
        config,
    )
    assert parsed == {
        "hidden_size": 32,
        "use_mask_token": False,
        "shared_lm_head": True,
        "layer_norm_eps": 1e-5,
        "drop_path_rate": 1.0,
        "hidden_act": "gelu_new",
    }
    assert [type(parsed[key]) for key in ("hidden_size", "use_mask_token", "drop_path_rate")] == [int, bool, float]
    assert parse_config_overrides(None, config) == parse_config_overrides("  ", config) == {}


def test_an_int_attribute_annotated_float_takes_a_float():
    # A saved drop path rate of 0 reads back as an int; the field is `float | int`, so 0.1 must still parse.
    config = BeitV2Config(drop_path_rate=0)
    assert parse_config_overrides("drop_path_rate=0.1", config) == {"drop_path_rate": 0.1}
    with pytest.raises(ValueError, match=r"hidden_size takes an int \(it is 768 now\), got '0.5'"):
        parse_config_overrides("hidden_size=0.5", config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("codebook=64", r"has no 'codebook'; did you mean codebook_size"),
        ("hidden_size", r"must look like key=value, got 'hidden_size'"),
        ("code_dim=8,,beta=1", r"must look like key=value, got ''"),
        ("=3", r"must look like key=value"),
        ("beta=1,beta=2", r"sets beta twice"),
        ("kmeans_init=maybe", r"kmeans_init takes true/false/1/0"),
        ("codebook_size=many", r"codebook_size takes an int"),
        ("decay=fast", r"decay takes a float"),
        ("encoder.hiden_size=8", r"has no 'encoder.hiden_size'; did you mean encoder.hidden_size"),
        ("encoder.pool_scales=1", r"cannot set encoder.pool_scales: only bool, int, float and str"),
        ("model_type=beit", r"has no 'model_type'"),
    ],
)
def test_bad_overrides_are_refused_by_name(text, message):
    with pytest.raises(ValueError, match=message):
        parse_config_overrides(text, VQKDConfig())


def test_an_unknown_key_with_nothing_close_lists_the_valid_keys():
    with pytest.raises(ValueError, match=r"has no 'zzz'; valid keys are \[.*'hidden_size'"):
        parse_config_overrides("zzz=1", BeitV2Config())


def test_sub_config_keys_go_to_one_or_all_sub_configs():
    parsed = parse_config_overrides(
        "decoder.hidden_size=64,codebook_size=16,hidden_size=32,encoder.drop_path_rate=0.1", VQKDConfig()
    )
    assert parsed == {
        "codebook_size": 16,
        # The prefixed key wins over the one sent to both, whatever their order.
        "encoder_config": {"hidden_size": 32, "drop_path_rate": 0.1},
        "decoder_config": {"hidden_size": 64},
    }


# --- rebuilding through the constructor ----------------------------------------------------------------------------


def test_overrides_rebuild_the_config_so_that_its_checks_run():
    config = BeitV2Config.from_preset("tiny")
    # `update_from_string` would set num_hidden_layers=2 and keep early_layers=9: a model that cannot be built.
    with pytest.raises(ValueError, match=r"early_layers must lie in \[1, num_hidden_layers - 1\] = \[1, 1\]"):
        rebuild_config(config, parse_config_overrides("num_hidden_layers=2", config))
    deeper = rebuild_config(config, parse_config_overrides("num_hidden_layers=6,early_layers=3", config))
    assert (deeper.num_hidden_layers, deeper.early_layers) == (6, 3)
    # The backbone outputs follow the new depth instead of keeping the old default (`stage12`).
    assert deeper.out_indices == [6] and deeper.stage_names[-1] == "stage6"
    assert (config.num_hidden_layers, config.early_layers) == (12, 9)
    assert parse_config_overrides(None, config) == {}


def test_a_chosen_backbone_output_survives_a_rebuild():
    config = BeitV2Config.from_preset("tiny", out_indices=[3, 6])
    assert rebuild_config(config, parse_config_overrides("hidden_dropout_prob=0.1", config)).out_indices == [3, 6]


# --- mim_config ------------------------------------------------------------------------------------------------------


def test_mim_config_applies_the_preset_the_arguments_and_the_overrides():
    config = tiny_mim(drop_path_rate=0.1)
    assert (config.hidden_size, config.num_hidden_layers, config.early_layers) == (32, 4, 2)
    assert (config.image_size, config.patch_size, config.vocab_size, config.drop_path_rate) == (32, 8, 64, 0.1)
    assert config.intermediate_size == 64 and config.use_patch_aggregation
    assert not tiny_mim(beit_v1=True).use_patch_aggregation
    base = mim_config(
        "base", image_size=224, vocab_size=8192, overrides=None, drop_path_rate=None, beit_v1=False, hub_kwargs={}
    )
    assert base.to_diff_dict() == BeitV2Config.from_preset("base").to_diff_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overrides": TINY_MIM + ",image_size=64"}, r"sets image_size=64, but --image_size decides it \(32\)"),
        ({"overrides": TINY_MIM + ",vocab_size=32"}, r"vocab_size=32, but the tokenizer's codebook size decides it"),
        (
            {"overrides": TINY_MIM + ",drop_path_rate=0.2", "drop_path_rate": 0.1},
            r"drop_path_rate=0.2, but --drop_path_rate decides it \(0.1\)",
        ),
        (
            {"overrides": TINY_MIM + ",use_patch_aggregation=true", "beit_v1": True},
            r"use_patch_aggregation=True, but --beit_v1 decides it",
        ),
        ({"overrides": TINY_MIM + ",early_layer=2"}, r"has no 'early_layer'; did you mean early_layers"),
    ],
)
def test_mim_config_refuses_overrides_that_contradict_the_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_mim(**kwargs)


def test_mim_config_accepts_overrides_that_agree_with_the_arguments():
    config = tiny_mim(overrides=TINY_MIM + ",image_size=32,drop_path_rate=0.1", drop_path_rate=0.1)
    assert (config.image_size, config.drop_path_rate) == (32, 0.1)
    # Without --drop_path_rate the override decides.
    assert tiny_mim(overrides=TINY_MIM + ",drop_path_rate=0.3").drop_path_rate == 0.3


def test_mim_config_loads_a_saved_config_by_path(tmp_path):
    tiny_mim(image_size=64).save_pretrained(tmp_path / "mine")
    config = tiny_mim(
        str(tmp_path / "mine"), vocab_size=16, overrides="head_layers=1", hub_kwargs={"trust_remote_code": True}
    )
    assert type(config) is BeitV2Config
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.vocab_size) == (32, 4, 32, 16)
    assert config.head_layers == 1


def test_mim_config_refuses_other_model_types_and_unknown_names(tmp_path):
    tiny_vqkd().save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(
        ValueError, match=r"is a 'beitv2_vqkd' config; this script needs a 'beitv2' config or a preset"
    ):
        tiny_mim(str(tmp_path / "tokenizer"), overrides=None)
    with pytest.raises(ValueError, match=re.escape(f"neither a preset {sorted(BEITV2_PRESETS)}")):
        tiny_mim(str(tmp_path / "missing"), overrides=None)


def test_config_name_passes_the_hub_arguments_and_takes_our_class(monkeypatch):
    """`revision`, `token`, `trust_remote_code` reach AutoConfig (unset ones are left to its defaults); a config of
    the Hub's copy of the class (what trust_remote_code may load) comes back as this package's class."""

    class HubCopyOfBeitV2Config(BeitV2Config):
        pass

    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return HubCopyOfBeitV2Config(**BEITV2_PRESETS["small"])

    monkeypatch.setattr(AutoConfig, "from_pretrained", fake_from_pretrained)
    hub = {"revision": "v1.0", "token": "secret", "trust_remote_code": True}
    config = tiny_mim("someone/beitv2", image_size=224, overrides=None, hub_kwargs=hub)
    assert calls == [("someone/beitv2", hub)]
    assert type(config) is BeitV2Config and config.hidden_size == 384
    tiny_mim("someone/beitv2", image_size=224, overrides=None, hub_kwargs={"revision": None, "token": None})
    assert calls[-1] == ("someone/beitv2", {})
    with pytest.raises(
        ValueError,
        match=r"hub_kwargs \['cache'\] are not supported; choose from \['revision', 'token', 'trust_remote_code'\]",
    ):
        tiny_mim("someone/beitv2", image_size=224, overrides=None, hub_kwargs={"cache": "/tmp"})


# --- vqkd_config ---------------------------------------------------------------------------------------------------


def test_vqkd_config_fits_the_teacher_and_routes_the_overrides():
    config = vqkd_config(
        "tiny",  # alias of tiny-decoder1
        image_size=56,
        teacher_patch_size=14,
        teacher_dim=768,
        overrides=TINY_VQKD + ",decoder.num_hidden_layers=2,encoder.drop_path_rate=0.1,decay=0.9",
        hub_kwargs={},
    )
    encoder, decoder = config.encoder_config, config.decoder_config
    assert (config.codebook_size, config.code_dim, config.decay, config.teacher_dim) == (16, 8, 0.9, 768)
    assert (encoder.image_size, encoder.patch_size, encoder.hidden_size, encoder.num_hidden_layers) == (56, 14, 32, 1)
    assert (decoder.image_size, decoder.patch_size, decoder.num_channels) == (4, 1, 8)  # the grid of codes
    assert (decoder.hidden_size, decoder.num_hidden_layers) == (32, 2)
    assert (encoder.drop_path_rate, decoder.drop_path_rate) == (0.1, 0.0)
    # A config that builds a model.
    assert VQKDModel(config).config.patch_grid == (4, 4)


def test_vqkd_config_presets_match_the_table():
    config = vqkd_config("base", image_size=224, teacher_patch_size=16, teacher_dim=512, overrides=None, hub_kwargs={})
    assert config.to_diff_dict() == VQKDConfig.from_preset("base-decoder3").to_diff_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overrides": "codebook=64"}, r"has no 'codebook'; did you mean codebook_size"),
        ({"overrides": "encoder.image_size=64"}, r"encoder.image_size=64, but --image_size decides it \(32\)"),
        ({"overrides": "patch_size=4"}, r"encoder.patch_size=4, but the teacher's patch size decides it \(8\)"),
        ({"overrides": "teacher_dim=32"}, r"teacher_dim=32, but the teacher's feature size decides it \(16\)"),
        ({"overrides": "code_dim=8,decoder.num_channels=4"}, r"decoder.num_channels=4, but code_dim decides it \(8\)"),
        ({"image_size": 36}, r"--image_size 36 is not a multiple of the teacher's patch size 8"),
        ({"overrides": "decay=1.5"}, r"decay must lie in \[0, 1\)"),
    ],
)
def test_vqkd_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_vqkd(**kwargs)


def test_vqkd_config_loads_a_saved_tokenizer_config(tmp_path):
    tiny_vqkd().save_pretrained(tmp_path / "tokenizer")
    config = tiny_vqkd(
        str(tmp_path / "tokenizer"), image_size=64, teacher_patch_size=16, teacher_dim=24, overrides="beta=0.5"
    )
    assert (config.codebook_size, config.encoder_config.hidden_size, config.beta, config.teacher_dim) == (
        16,
        32,
        0.5,
        24,
    )
    assert (config.encoder_config.patch_size, config.decoder_config.image_size) == (16, 4)


# --- pretrained_config_updates -------------------------------------------------------------------------------------


def test_pretrained_mim_model_gets_drop_path_and_dropout(tmp_path):
    torch.manual_seed(0)
    model = BeitV2ForMaskedImageModeling(tiny_mim())
    model.save_pretrained(tmp_path)
    saved = AutoConfig.from_pretrained(tmp_path)
    updates = pretrained_config_updates(saved, image_size=32, drop_path_rate=0.2, overrides="hidden_dropout_prob=0.1")
    loaded = BeitV2ForMaskedImageModeling.from_pretrained(tmp_path, **updates)
    assert (loaded.config.drop_path_rate, loaded.config.hidden_dropout_prob) == (0.2, 0.1)
    # Stochastic depth really is on: the deepest block of the main branch drops paths at the full rate.
    assert loaded.beit.layers[-1].drop_path.drop_prob == pytest.approx(0.2)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    # Nothing to change: load as saved.
    assert pretrained_config_updates(saved, image_size=None, drop_path_rate=None, overrides=None) == {}
    assert pretrained_config_updates(saved, image_size=32, drop_path_rate=0.0, overrides="hidden_size=32") == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 64}, r"--image_size 64 differs from the pretrained model's image_size 32"),
        (
            {"overrides": "hidden_size=64,vocab_size=8"},
            r"cannot change \['hidden_size', 'vocab_size'\] of a pretrained",
        ),
        (
            {"overrides": "patch_size=4"},
            r"cannot change \['patch_size'\].*only \['attention_probs_dropout_prob', 'drop_path_rate', 'hidden_dropout_prob'\]",
        ),
        ({"overrides": "drop_rate=0.1"}, r"has no 'drop_rate'"),
    ],
)
def test_pretrained_mim_model_refuses_architecture_changes(kwargs, message):
    settings = {"image_size": None, "drop_path_rate": None, "overrides": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        pretrained_config_updates(tiny_mim(), **settings)


def test_pretrained_tokenizer_gets_codebook_settings_and_drop_path_in_both_vits(tmp_path):
    VQKDModel(tiny_vqkd()).save_pretrained(tmp_path)
    saved = AutoConfig.from_pretrained(tmp_path)
    updates = pretrained_config_updates(
        saved, image_size=32, drop_path_rate=0.1, overrides="decay=0.9,decoder.attention_probs_dropout_prob=0.2"
    )
    loaded = VQKDModel.from_pretrained(tmp_path, **updates)
    config = loaded.config
    assert config.decay == 0.9 and loaded.quantizer.decay == 0.9
    assert (config.encoder_config.drop_path_rate, config.decoder_config.drop_path_rate) == (0.1, 0.1)
    assert (
        config.encoder_config.attention_probs_dropout_prob,
        config.decoder_config.attention_probs_dropout_prob,
    ) == (0.0, 0.2)
    with pytest.raises(ValueError, match=r"cannot change \['codebook_size', 'decoder.num_hidden_layers'\]"):
        pretrained_config_updates(
            saved, image_size=None, drop_path_rate=None, overrides="codebook_size=32,decoder.num_hidden_layers=2"
        )
    with pytest.raises(ValueError, match=r"--image_size 64 differs from the pretrained model's image_size 32"):
        pretrained_config_updates(saved, image_size=64, drop_path_rate=None, overrides=None)


def test_vqkd_config_builds_presets_at_the_teachers_patch_size():
    config = vqkd_config("base", image_size=224, teacher_patch_size=14, teacher_dim=768, overrides=None, hub_kwargs={})
    expected = VQKDConfig.from_preset("base-decoder3", image_size=224, patch_size=14, teacher_dim=768)
    assert config.to_diff_dict() == expected.to_diff_dict()
