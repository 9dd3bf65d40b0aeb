"""Model configs from the command line, strictly: `--config_name`, `--config_overrides`, `--image_size` and
`--drop_path_rate` of the pretraining scripts become a validated `PreTrainedConfig`, or are refused with a clear
error; nothing is dropped silently.

- `--config_name` is a preset of `modeling_beitv2` (`BEITV2_PRESETS`, `VQKD_PRESETS` and the short VQ-KD names of
  `VQKD_CONFIG_ALIASES`) or anything `AutoConfig.from_pretrained` loads (a Hub id or a folder), with `revision`,
  `token` and `trust_remote_code` passed through. A preset name wins over a folder of the same name.
- `--config_overrides "key=value,key=value"` parses like transformers' `PretrainedConfig.update_from_string`: the
  value takes the type of the attribute it replaces (bool: true/false/1/0, int, float, str) and a key the config
  does not have is an error, which names the closest valid keys. A config with sub-configs (VQ-KD's
  `encoder_config` / `decoder_config`) takes `encoder.` / `decoder.` prefixes for one of them, and sends a key that
  only the sub-configs have to all of them. Unlike `update_from_string`, the config is then rebuilt through its
  constructor, so that its checks run (e.g. `BeitV2Config`'s on `early_layers`).
- A setting that another argument decides (`--image_size`, the tokenizer's codebook size, the teacher's patch and
  feature size...) may appear in `--config_overrides` only with that same value.
- With `--model_name_or_path`, what does not change the architecture (drop path, dropout, the codebook's EMA
  hyperparameters) is applied to the pretrained model; anything else is refused by name.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from modeling_beitv2 import BEITV2_PRESETS, VQKD_PRESETS, BeitV2Config, VQKDConfig

# Short names accepted by run_vqkd.py's --config_name, like run_mim.py's "tiny" / "base".
VQKD_CONFIG_ALIASES: dict[str, str] = {"tiny": "tiny-decoder1", "base": "base-decoder3"}
# The keyword arguments of `from_pretrained` that --config_name passes through to the Hub.
HUB_KWARGS: tuple[str, ...] = ("revision", "token", "trust_remote_code")
# What may change on a pretrained model: regularisation and the codebook's training hyperparameters. None of them
# changes a parameter's shape or what the saved weights compute at inference.
PRETRAINED_SETTINGS: frozenset[str] = frozenset(
    {"drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob", "decay", "beta", "dead_code_threshold"}
)

# `to_dict()` keys that describe the file rather than the model (`model_type` is a class attribute), or that the
# config derives itself (`stage_names` from the depth of a backbone config).
_NOT_SETTABLE = frozenset({"transformers_version", "model_type", "_name_or_path", "auto_map", "stage_names"})
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def parse_config_overrides(text: str | None, config: PreTrainedConfig) -> dict[str, Any]:
    """Parse `"key=value,key=value"` into values typed like `config`'s current attributes.

    Args:
        text: the `--config_overrides` string; `None` or blank gives `{}`.
        config: the config the overrides will apply to; it decides which keys exist and their types.

    Returns:
        `{key: value}`; for a config with sub-configs, the keys of a sub-config are gathered in a dict under the
        sub-config's attribute, e.g. `{"codebook_size": 64, "encoder_config": {"hidden_size": 32}}`. A prefixed key
        (`decoder.hidden_size`) wins over the same key sent to all sub-configs (`hidden_size`).

    Raises:
        ValueError: a malformed or repeated item, a key `config` does not have (naming the closest valid ones), a
            value that does not parse as the attribute's type, or an attribute that is not a bool, int, float or str.
    """
    sub_configs = _sub_configs(config)
    top_keys = _settable_keys(config) - set(sub_configs)
    shared_keys = set.intersection(*(_settable_keys(sub) for sub in sub_configs.values())) if sub_configs else set()
    parsed: dict[str, Any] = {}
    specific: dict[str, dict[str, Any]] = {}  # prefixed keys, merged last so that they win
    for key, raw in _split_items(text):
        prefix, dot, rest = key.partition(".")
        if dot and f"{prefix}_config" in sub_configs:
            sub = sub_configs[f"{prefix}_config"]
            if rest not in _settable_keys(sub):
                raise _unknown_key_error(key, sorted(f"{prefix}.{name}" for name in _settable_keys(sub)), config)
            specific.setdefault(f"{prefix}_config", {})[rest] = _typed_value(key, raw, sub, rest)
        elif key in top_keys:
            parsed[key] = _typed_value(key, raw, config, key)
        elif key in shared_keys:
            for name, sub in sub_configs.items():
                parsed.setdefault(name, {})[key] = _typed_value(key, raw, sub, key)
        else:
            prefixed = {
                f"{name.removesuffix('_config')}.{k}" for name, sub in sub_configs.items() for k in _settable_keys(sub)
            }
            raise _unknown_key_error(key, sorted(top_keys | shared_keys | prefixed), config)
    for name, values in specific.items():
        parsed[name] = {**parsed.get(name, {}), **values}
    return parsed


def apply_config_overrides(config: PreTrainedConfig, text: str | None) -> PreTrainedConfig:
    """`config` with `--config_overrides` applied, rebuilt through its constructor so that its checks run.

    `config` itself is left unchanged; without overrides it is returned as is.
    """
    updates = parse_config_overrides(text, config)
    return _rebuild(config, updates) if updates else config


def mim_config(
    config_name: str,
    *,
    image_size: int,
    vocab_size: int,
    overrides: str | None,
    drop_path_rate: float | None,
    beit_v1: bool,
    hub_kwargs: Mapping[str, Any],
) -> BeitV2Config:
    """The `BeitV2Config` of a new masked-image-modeling model (run_mim.py without --model_name_or_path).

    Args:
        config_name: a `BEITV2_PRESETS` name, or a `beitv2` config's Hub id or folder.
        image_size: training resolution (`--image_size`).
        vocab_size: the tokenizer's codebook size, which the model predicts.
        overrides: `--config_overrides`, applied to the preset or loaded config.
        drop_path_rate: `--drop_path_rate`; `None` keeps the config's.
        beit_v1: BEiT v1 masked image modeling: no patch aggregation.
        hub_kwargs: `revision` / `token` / `trust_remote_code` for loading `config_name`.

    Raises:
        ValueError: unknown `config_name`, a loaded config that is not a `beitv2` one, a bad override, an override
            that contradicts one of the other arguments, or a config that fails `BeitV2Config`'s checks.
    """
    base = _named_config(config_name, BeitV2Config, BEITV2_PRESETS, {}, hub_kwargs)
    fixed: dict[str, Any] = {
        "image_size": (image_size, "--image_size"),
        "vocab_size": (vocab_size, "the tokenizer's codebook size"),
    }
    if beit_v1:
        fixed["use_patch_aggregation"] = (False, "--beit_v1")
    if drop_path_rate is not None:
        fixed["drop_path_rate"] = (float(drop_path_rate), "--drop_path_rate")
    updates = _merge_fixed(parse_config_overrides(overrides, base), fixed)
    return _rebuild(base, updates)


def vqkd_config(
    config_name: str,
    *,
    image_size: int,
    teacher_patch_size: int,
    teacher_dim: int,
    overrides: str | None,
    hub_kwargs: Mapping[str, Any],
) -> VQKDConfig:
    """The `VQKDConfig` of a new tokenizer (run_vqkd.py without --model_name_or_path), fitted to its teacher.

    The encoder takes the teacher's patch size at `image_size`, the decoder covers the resulting grid of codes
    (patch size 1, `num_channels == code_dim`) and `teacher_dim` is the teacher's feature size. A preset is built
    at that resolution and patch size by `VQKDConfig.from_preset`; a loaded config is refitted to them.

    Args:
        config_name: a `VQKD_PRESETS` name, an alias of `VQKD_CONFIG_ALIASES`, or a `beitv2_vqkd` config's Hub id
            or folder (its encoder / decoder sizes and codebook are kept, the teacher-dependent keys are refitted).
        image_size: training resolution; a multiple of `teacher_patch_size`.
        teacher_patch_size: the teacher's patch size, which the encoder must share so that the patches align.
        teacher_dim: the teacher's feature size, which the decoder regresses.
        overrides: `--config_overrides`. Tokenizer keys (`codebook_size`, `code_dim`, `decay`, `beta`, `kmeans_init`,
            `dead_code_threshold`, ...) apply to the tokenizer, `encoder.` / `decoder.` prefixed keys to one ViT,
            other keys to both ViTs.
        hub_kwargs: `revision` / `token` / `trust_remote_code` for loading `config_name`.

    Raises:
        ValueError: as `mim_config`, or an `image_size` that is not a multiple of `teacher_patch_size`.
    """
    if image_size % teacher_patch_size:
        raise ValueError(
            f"--image_size {image_size} is not a multiple of the teacher's patch size {teacher_patch_size}."
        )
    preset_kwargs = {"image_size": image_size, "patch_size": teacher_patch_size}
    base = _named_config(config_name, VQKDConfig, VQKD_PRESETS, VQKD_CONFIG_ALIASES, hub_kwargs, preset_kwargs)
    grid = image_size // teacher_patch_size
    parsed = parse_config_overrides(overrides, base)
    code_dim = parsed.get("code_dim", base.code_dim)
    # For a preset these only restate what `from_preset` built; they refit a loaded config, and refuse overrides
    # that contradict the teacher.
    fixed = {
        "teacher_dim": (teacher_dim, "the teacher's feature size"),
        "encoder_config": {
            "image_size": (image_size, "--image_size"),
            "patch_size": (teacher_patch_size, "the teacher's patch size"),
        },
        "decoder_config": {
            # The decoder reads the grid of codes: one position per patch, `code_dim` channels each.
            "image_size": (grid, "--image_size / the teacher's patch size"),
            "patch_size": (1, "the decoder's design (one code per position)"),
            "num_channels": (code_dim, "code_dim"),
        },
    }
    return _rebuild(base, _merge_fixed(parsed, fixed))


def pretrained_config_updates(
    config: PreTrainedConfig, *, image_size: int | None, drop_path_rate: float | None, overrides: str | None
) -> dict[str, Any]:
    """What to pass to `from_pretrained(name, **updates)` to honour `--image_size`, `--drop_path_rate` and
    `--config_overrides` with `--model_name_or_path`.

    Only `PRETRAINED_SETTINGS` (drop path, dropout, the codebook's EMA hyperparameters) can change: they leave the
    architecture alone. `drop_path_rate` goes to every sub-config that has one (both ViTs of a VQ-KD tokenizer).

    Args:
        config: the pretrained model's config, as `AutoConfig.from_pretrained` loads it.
        image_size: `--image_size`; `None` or the saved resolution are accepted, anything else is refused.
        drop_path_rate: `--drop_path_rate`; `None` keeps the saved one.
        overrides: `--config_overrides`, parsed against `config`.

    Returns:
        `{}` when nothing changes, else `{"config": new_config}` with `new_config` rebuilt through its constructor.

    Raises:
        ValueError: an unknown or malformed override, or a change to anything but `PRETRAINED_SETTINGS`, naming the
            keys.
    """
    updates = parse_config_overrides(overrides, config)
    if drop_path_rate is not None:
        updates = _merge_fixed(
            updates, _wherever(config, "drop_path_rate", (float(drop_path_rate), "--drop_path_rate"))
        )
    if image_size is not None:
        saved = _saved_image_size(config)
        if _as_pair(image_size) != _as_pair(saved):
            raise ValueError(
                f"--image_size {image_size} differs from the pretrained model's image_size {saved}: its position "
                "embeddings / bias tables are sized for it. Leave --image_size out or set it to the saved one "
                "(the fine-tuning scripts resize them), or start a new model from --config_name."
            )
    changes = _changes(config, updates)
    refused = sorted(key for key in _flat_keys(changes) if key.rpartition(".")[2] not in PRETRAINED_SETTINGS)
    if refused:
        allowed = sorted(
            key for key in _flat_keys(_all_settable(config)) if key.rpartition(".")[2] in PRETRAINED_SETTINGS
        )
        raise ValueError(
            f"--config_overrides cannot change {refused} of a pretrained {type(config).__name__}: they change the "
            f"architecture or what the saved weights mean. With --model_name_or_path only {allowed} can change; "
            "start from --config_name to build a different model."
        )
    return {"config": _rebuild(config, changes)} if changes else {}


def _split_items(text: str | None) -> list[tuple[str, str]]:
    if text is None or not text.strip():
        return []
    items: list[tuple[str, str]] = []
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"--config_overrides items must look like key=value, got {item.strip()!r} in {text!r}.")
        if any(key == seen for seen, _ in items):
            raise ValueError(f"--config_overrides sets {key} twice in {text!r}.")
        items.append((key, value))
    return items


def _settable_keys(config: PreTrainedConfig) -> set[str]:
    return set(config.to_dict()) - _NOT_SETTABLE


def _sub_configs(config: PreTrainedConfig) -> dict[str, PreTrainedConfig]:
    return {
        key: getattr(config, key)
        for key in config.to_dict()
        if isinstance(getattr(config, key, None), PreTrainedConfig)
    }


def _all_settable(config: PreTrainedConfig) -> dict[str, Any]:
    """Every settable key of `config` as `{key: None}`, sub-configs nested, for listing valid keys."""
    sub_configs = _sub_configs(config)
    keys: dict[str, Any] = dict.fromkeys(_settable_keys(config) - set(sub_configs))
    keys.update({name: _all_settable(sub) for name, sub in sub_configs.items()})
    return keys


def _flat_keys(nested: Mapping[str, Any]) -> list[str]:
    """`{"a": 1, "encoder_config": {"b": 2}}` -> `["a", "encoder.b"]`, the way --config_overrides spells them."""
    keys = []
    for key, value in nested.items():
        if isinstance(value, Mapping):
            keys.extend(f"{key.removesuffix('_config')}.{name}" for name in _flat_keys(value))
        else:
            keys.append(key)
    return keys


def _field_annotation(config: PreTrainedConfig, key: str) -> str:
    if not dataclasses.is_dataclass(config):
        return ""
    annotations = {item.name: item.type for item in dataclasses.fields(config)}
    return str(annotations.get(key, ""))


def _typed_value(spelled: str, raw: str, config: PreTrainedConfig, key: str) -> Any:
    """`raw` as the type of `config.<key>`'s current value (`spelled` is the key as the user wrote it)."""
    current = getattr(config, key)
    if isinstance(current, bool):  # before int: a bool is an int
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise _bad_value(spelled, raw, current, "true/false/1/0")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            # A field annotated `float | int` may hold an int now (e.g. a drop path rate of 0) and take a float.
            if "float" not in _field_annotation(config, key):
                raise _bad_value(spelled, raw, current, "an int") from None
    if isinstance(current, (int, float)):
        try:
            return float(raw)
        except ValueError:
            raise _bad_value(spelled, raw, current, "a float") from None
    if isinstance(current, str):
        return raw
    raise ValueError(
        f"--config_overrides cannot set {spelled}: only bool, int, float and str attributes can be set this way, "
        f"and it is {current!r}."
    )


def _bad_value(spelled: str, raw: str, current: Any, expected: str) -> ValueError:
    return ValueError(f"--config_overrides: {spelled} takes {expected} (it is {current!r} now), got {raw!r}.")


def _unknown_key_error(key: str, valid: list[str], config: PreTrainedConfig) -> ValueError:
    renamed = getattr(config, "renamed_arguments", {})
    closest = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if key in renamed:
        hint = f"it is now called {renamed[key]}."
    elif closest:
        hint = f"did you mean {' or '.join(closest)}?"
    else:
        hint = f"valid keys are {valid}."
    return ValueError(f"--config_overrides: {type(config).__name__} has no {key!r}; {hint}")


def _constructor_kwargs(config: PreTrainedConfig) -> dict[str, Any]:
    """Keyword arguments that rebuild `config` through its constructor."""
    kwargs = {key: value for key, value in config.to_dict().items() if key not in _NOT_SETTABLE - {"_name_or_path"}}
    if getattr(config, "stage_names", None) is not None:
        # A backbone config derives out_features / out_indices from its depth when they are not given: pass them on
        # only when they were chosen, so that a new num_hidden_layers gets its own default instead of a stale one.
        kwargs.pop("out_features", None)
        if list(config.out_indices) == [len(config.stage_names) - 1]:
            kwargs.pop("out_indices", None)
    for key, value in kwargs.items():
        if isinstance(getattr(config, key, None), PreTrainedConfig):
            kwargs[key] = _constructor_kwargs(getattr(config, key)) if value is not None else value
    return kwargs


def _rebuild(config: PreTrainedConfig, updates: Mapping[str, Any]) -> PreTrainedConfig:
    """A new `type(config)` from `config`'s values with `updates` on top (sub-config dicts merged key by key)."""
    kwargs = _constructor_kwargs(config)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(getattr(config, key, None), PreTrainedConfig):
            kwargs[key] = {**kwargs[key], **value}
        else:
            kwargs[key] = value
    return type(config)(**kwargs)


def _merge_fixed(parsed: Mapping[str, Any], fixed: Mapping[str, Any], scope: str = "") -> dict[str, Any]:
    """`parsed` plus the settings other arguments decide (`fixed`: `{key: (value, source)}`, nested for
    sub-configs); an override that contradicts one of them is refused."""
    merged = dict(parsed)
    for key, spec in fixed.items():
        if isinstance(spec, Mapping):
            merged[key] = _merge_fixed(parsed.get(key, {}), spec, scope=f"{scope}{key.removesuffix('_config')}.")
            continue
        value, source = spec
        if key in parsed and parsed[key] != value:
            raise ValueError(
                f"--config_overrides sets {scope}{key}={parsed[key]!r}, but {source} decides it ({value!r}); "
                f"leave {scope}{key} out of --config_overrides."
            )
        merged[key] = value
    return merged


def _wherever(config: PreTrainedConfig, key: str, spec: tuple[Any, str]) -> dict[str, Any]:
    """`{key: spec}` for `config`, or for each of its sub-configs that has `key` when it has none itself."""
    sub_configs = _sub_configs(config)
    if key in _settable_keys(config) - set(sub_configs):
        return {key: spec}
    scoped = {name: {key: spec} for name, sub in sub_configs.items() if key in _settable_keys(sub)}
    if not scoped:
        raise ValueError(f"{type(config).__name__} has no {key}.")
    return scoped


def _changes(config: PreTrainedConfig, updates: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `updates` that differ from `config`'s current values (sub-configs compared key by key)."""
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        current = getattr(config, key)
        if isinstance(value, Mapping) and isinstance(current, PreTrainedConfig):
            if nested := _changes(current, value):
                changes[key] = nested
        elif value != current:
            changes[key] = value
    return changes


def _saved_image_size(config: PreTrainedConfig) -> int | list[int] | tuple[int, int]:
    # A tokenizer's resolution is its encoder's (the decoder's image_size is the grid of codes).
    owner = config if hasattr(config, "image_size") else getattr(config, "encoder_config", None)
    if owner is None or not hasattr(owner, "image_size"):
        raise ValueError(f"{type(config).__name__} has no image_size to compare --image_size with.")
    return owner.image_size


def _as_pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _hub_kwargs(hub_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise ValueError(f"hub_kwargs {unknown} are not supported; choose from {list(HUB_KWARGS)}.")
    # `None` means "not given": from_pretrained then uses its own defaults.
    return {key: value for key, value in hub_kwargs.items() if value is not None}


def _named_config(
    config_name: str,
    config_class: type[PreTrainedConfig],
    presets: Mapping[str, Any],
    aliases: Mapping[str, str],
    hub_kwargs: Mapping[str, Any],
    preset_kwargs: Mapping[str, Any] | None = None,
) -> PreTrainedConfig:
    """A preset (or alias) of `config_class`, built by its `from_preset` with `preset_kwargs`, else the
    `config_class` config that `AutoConfig` loads."""
    name = aliases.get(config_name, config_name)
    if name in presets:
        return config_class.from_preset(name, **(preset_kwargs or {}))
    choices = sorted(presets) + (sorted(aliases) if aliases else [])
    try:
        loaded = AutoConfig.from_pretrained(config_name, **_hub_kwargs(hub_kwargs))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--config_name {config_name!r} is neither a preset {choices} nor a config AutoConfig can load: {error}"
        ) from error
    if loaded.model_type != config_class.model_type:
        raise ValueError(
            f"--config_name {config_name!r} is a {loaded.model_type!r} config; this script needs a "
            f"{config_class.model_type!r} config or a preset {choices}."
        )
    if type(loaded) is not config_class:
        # With trust_remote_code the Hub's copy of the class is loaded: rebuild it as this package's, so that its
        # checks run and the model classes here accept it.
        loaded = config_class(**_constructor_kwargs(loaded))
    return loaded
