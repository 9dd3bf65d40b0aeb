"""Reading released checkpoints: state-dict wrappers, and the DALL-E pickles without the `dall_e` package or any
class a checkpoint should not be able to make the loader import."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from modeling_beitv2.checkpoint_reading import load_dalle_pickle, load_state_dict
from modeling_beitv2.convert_unilm import convert_checkpoint


def test_load_state_dict_wrappers(tmp_path):
    weights = {"cls_token": torch.zeros(1, 1, 4)}
    for wrapper in ("model", "module", "state_dict"):
        torch.save({wrapper: weights, "optimizer": {"state": {}}}, tmp_path / "a.pth")
        assert load_state_dict(tmp_path / "a.pth").keys() == {"cls_token"}
    torch.save({"module.cls_token": weights["cls_token"]}, tmp_path / "ddp.bin")
    assert load_state_dict(tmp_path / "ddp.bin").keys() == {"cls_token"}
    torch.save({"model": weights, "args": {"lr": 0.1}, "note": "x"}, tmp_path / "train.pth")
    assert load_state_dict(tmp_path / "train.pth").keys() == {"cls_token"}
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"not tensors: \['epoch', 'lr'\]"):
        load_state_dict(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pth")


class _Arbitrary:
    """A class no checkpoint may make the loader import."""


def _install_fake_dall_e(monkeypatch):
    """A module named like the `dall_e` package, only to write pickles of the shape OpenAI published."""

    class Conv2d(torch.nn.Module):
        def __init__(self, n_in, n_out, kw):
            super().__init__()
            self.kw = kw
            self.w = torch.nn.Parameter(torch.randn(n_out, n_in, kw, kw))
            self.b = torch.nn.Parameter(torch.randn(n_out))

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.device = torch.device("cpu")
            self.blocks = torch.nn.Sequential()
            self.blocks.add_module("input", Conv2d(3, 4, 7))
            self.blocks.add_module("relu", torch.nn.ReLU())
            self.blocks.add_module("pool", torch.nn.MaxPool2d(2))

    for name, cls in (("dall_e.utils", Conv2d), ("dall_e.encoder", Encoder)):
        module = types.ModuleType(name)
        setattr(module, cls.__name__, cls)
        cls.__module__, cls.__qualname__ = name, cls.__name__
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "dall_e", types.ModuleType("dall_e"))
    return Encoder


def test_dalle_pickle_restricted_unpickler(tmp_path, monkeypatch):
    encoder_class = _install_fake_dall_e(monkeypatch)
    encoder = encoder_class()
    torch.save(encoder, tmp_path / "encoder.pkl")
    monkeypatch.delitem(sys.modules, "dall_e.encoder")
    monkeypatch.delitem(sys.modules, "dall_e.utils")  # the loader must not need the package

    state_dict = load_dalle_pickle(tmp_path / "encoder.pkl")
    assert state_dict.keys() == {"blocks.input.w", "blocks.input.b"}
    torch.testing.assert_close(state_dict["blocks.input.w"], encoder.blocks.input.w.detach())

    _Arbitrary.__module__ = __name__
    torch.save({"payload": _Arbitrary()}, tmp_path / "evil.pkl")
    with pytest.raises(ValueError, match="not a DALL-E encoder/decoder pickle"):
        load_dalle_pickle(tmp_path / "evil.pkl")


def test_dalle_dvae_needs_both_pickles(tmp_path, monkeypatch):
    encoder_class = _install_fake_dall_e(monkeypatch)
    torch.save(encoder_class(), tmp_path / "encoder.pkl")
    with pytest.raises(ValueError, match="needs both DALL-E pickles"):
        convert_checkpoint("dalle_dvae", tmp_path)
    with pytest.raises(ValueError, match="not apply to dalle_dvae"):
        convert_checkpoint("dalle_dvae", tmp_path, num_attention_heads=2)
