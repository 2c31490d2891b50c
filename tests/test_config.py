"""colossus.config: defaults, TOML loading, --set overrides, validation errors and the Grok-1 preset."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import pytest

from colossus.config import (
    ModelConfig,
    RunConfig,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    load_config,
    parse_override,
    validate,
)
from colossus.errors import UserError
from colossus.models.presets import PRESETS, get_preset

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "grok1.md"


def user_error(fn, *args, **kwargs) -> str:
    """Run fn expecting a UserError; return its message."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------ defaults


def test_defaults_validate_and_match_dataclass_defaults():
    """An empty config is valid and equals RunConfig() field for field."""
    validate(RunConfig())
    config = load_config()
    assert config == RunConfig()
    assert config_from_dict({}) == RunConfig()
    assert config.model.n_layers == 4 and config.train.global_batch % config.train.micro_batch == 0


def test_every_preset_validates():
    """Each named preset is a valid model (validation is run through config_from_dict)."""
    for name in PRESETS:
        config = config_from_dict({"model": {"preset": name}})
        assert config.model == PRESETS[name]
        assert config.model.name == name


def test_get_preset_returns_a_copy():
    """Mutating what get_preset returns must not change the registry."""
    preset = get_preset("tiny")
    preset.n_layers = 99
    assert PRESETS["tiny"].n_layers == 4
    assert get_preset("tiny").n_layers == 4


# ------------------------------------------------------------------------------------ TOML files


def test_toml_file_with_preset_and_overrides(tmp_path: Path):
    """[model] preset = "tiny" starts from the preset; other keys in the file and --set override it."""
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\npreset = "tiny"\nn_layers = 2\nffn_type = "swiglu"\n\n'
        "[train]\nsteps = 7\nglobal_batch = 8\nmicro_batch = 4\nlr = 1\n"
    )
    config = load_config(path, ["model.top_k=1", "train.compile=true", 'data.tokenizer="bpe"'])
    tiny = PRESETS["tiny"]
    assert config.model.n_layers == 2 and config.model.ffn_type == "swiglu" and config.model.top_k == 1
    # untouched fields come from the preset, not from ModelConfig defaults
    assert config.model.d_model == tiny.d_model == 256
    assert config.model.embedding_multiplier == pytest.approx(math.sqrt(256))
    assert config.model.name == "tiny-custom"
    assert config.train.steps == 7 and config.train.micro_batch == 4
    # an int given for a float key is accepted and stored as a float
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.compile is True
    assert config.data.tokenizer == "bpe"


def test_preset_alone_keeps_preset_name():
    """A preset with no other [model] keys keeps the preset's own name."""
    assert config_from_dict({"model": {"preset": "small"}}).model.name == "small"


def test_override_beats_file_value(tmp_path: Path):
    """--set replaces a key the file also sets."""
    path = tmp_path / "run.toml"
    path.write_text("[train]\nsteps = 5\n")
    assert load_config(path).train.steps == 5
    assert load_config(path, ["train.steps=11"]).train.steps == 11


def test_missing_config_file_names_the_file(tmp_path: Path):
    """A path that does not exist is a UserError naming the path."""
    path = tmp_path / "nope.toml"
    message = user_error(load_config, path)
    assert str(path) in message and "not found" in message


def test_invalid_toml_names_the_file(tmp_path: Path):
    """A file that is not TOML is a UserError naming the file, on one line."""
    path = tmp_path / "broken.toml"
    path.write_text("[model\nn_layers = = 3\n")
    message = user_error(load_config, path)
    assert str(path) in message and "TOML" in message
    assert "\n" not in message


def test_non_utf8_file_is_a_user_error(tmp_path: Path):
    """A binary file is reported as invalid TOML, not as a UnicodeDecodeError traceback."""
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert str(path) in user_error(load_config, path)


# ------------------------------------------------------------------------------------ --set


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train.steps=100", ("train", "steps", 100)),
        ("train.lr=3e-4", ("train", "lr", 3e-4)),
        ("train.lr = 0.5", ("train", "lr", 0.5)),
        ("train.compile=true", ("train", "compile", True)),
        ("log.tensorboard=false", ("log", "tensorboard", False)),
        ("train.device=cuda", ("train", "device", "cuda")),  # bare word: not TOML, kept as a string
        ('eval.sample_prompt="x = 1"', ("eval", "sample_prompt", "x = 1")),  # quoted, '=' inside
        ("data.source=/data/a=b.txt", ("data", "source", "/data/a=b.txt")),  # splits on the first '='
        ("model.name=grok-1", ("model", "name", "grok-1")),
    ],
)
def test_parse_override_values(text, expected):
    """Values are read as TOML (ints, floats, bools, quoted strings); anything else is a plain string."""
    section, key, value = parse_override(text)
    assert (section, key, value) == expected
    assert type(value) is type(expected[2])


@pytest.mark.parametrize("text", ["train.steps", "steps=100", "=3", "trainsteps=4"])
def test_parse_override_bad_forms(text):
    """Overrides without a '=' or without a section.key name are UserErrors quoting the input."""
    message = user_error(parse_override, text)
    assert repr(text) in message and "section.key=value" in message


def test_override_into_non_table_is_user_error(tmp_path: Path):
    """--set x.y=1 when the file has a scalar `x` is a UserError, not a crash."""
    path = tmp_path / "run.toml"
    path.write_text("train = 3\n")
    assert "[train]" in user_error(load_config, path, ["train.steps=1"])


def test_section_that_is_not_a_table():
    """A section given as a scalar is a UserError naming the section."""
    assert "[train]" in user_error(config_from_dict, {"train": 3})


# ------------------------------------------------------------------------------------ unknown names


def test_unknown_key_names_key_and_suggests_close_match():
    """A misspelt key is rejected with its full name and the closest known key."""
    message = user_error(config_from_dict, {"model": {"n_layer": 3}})
    assert "model.n_layer" in message
    assert "did you mean 'n_layers'" in message


def test_unknown_key_via_override():
    """The same check applies to --set overrides."""
    message = user_error(load_config, None, ["train.stpes=3"])
    assert "train.stpes" in message and "'steps'" in message


def test_unknown_section_names_section_and_suggests():
    """A misspelt section is rejected with its name and the closest known section."""
    message = user_error(config_from_dict, {"modle": {"n_layers": 3}})
    assert "[modle]" in message and "did you mean 'model'" in message


def test_unknown_key_in_preset_section():
    """Keys next to `preset` are still checked against ModelConfig's fields."""
    message = user_error(config_from_dict, {"model": {"preset": "tiny", "d_modle": 64}})
    assert "model.d_modle" in message and "'d_model'" in message


def test_unknown_preset():
    """An unknown preset name is a UserError that names it and lists the choices."""
    message = user_error(config_from_dict, {"model": {"preset": "grok-9"}})
    assert "'grok-9'" in message and "grok-1" in message and "tiny" in message
    assert "'nope'" in user_error(get_preset, "nope")


# ------------------------------------------------------------------------------------ wrong types


@pytest.mark.parametrize(
    "section, key, value, kind",
    [
        ("model", "n_layers", "4", "integer"),
        ("model", "n_layers", 4.0, "integer"),
        ("model", "n_layers", True, "integer"),
        ("train", "steps", 2.5, "integer"),
        ("train", "lr", "fast", "number"),
        ("train", "lr", False, "number"),
        ("train", "compile", 1, "true or false"),
        ("model", "ffn_type", 3, "string"),
        ("model", "preset", 1, "string"),
    ],
)
def test_wrong_types_name_the_key(section, key, value, kind):
    """Strings, floats and bools where an int is expected (and similar) are UserErrors naming the key."""
    message = user_error(config_from_dict, {section: {key: value}})
    assert f"{section}.{key}" in message
    assert kind in message


# ------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize(
    "model, keys",
    [
        (dict(d_model=100, n_heads=3), ("model.n_heads", "model.d_model")),
        (dict(n_heads=4, n_kv_heads=3), ("model.n_kv_heads", "model.n_heads")),
        (dict(n_experts=4, top_k=5), ("model.top_k", "model.n_experts")),
        (dict(head_dim=63), ("model.head_dim",)),
        (dict(ffn_type="relu"), ("model.ffn_type", "'relu'", "geglu")),
        (dict(norm="post"), ("model.norm", "'post'", "sandwich")),
        (dict(n_layers=0), ("model.n_layers",)),
        (dict(vocab_size=-1), ("model.vocab_size",)),
        (dict(attn_softcap=-1.0), ("model.attn_softcap",)),
        (dict(capacity_factor=-0.5), ("model.capacity_factor",)),
        (dict(embedding_multiplier=float("inf")), ("model.embedding_multiplier",)),
    ],
)
def test_impossible_model_shapes(model, keys):
    """Shapes that cannot build a model are UserErrors that name the offending keys."""
    message = user_error(config_from_dict, {"model": model})
    for key in keys:
        assert key in message


def test_micro_batch_must_divide_global_batch():
    """global_batch must split into whole micro-batches."""
    message = user_error(config_from_dict, {"train": {"global_batch": 10, "micro_batch": 4}})
    assert "train.micro_batch=4" in message and "train.global_batch=10" in message
    # 12 = 3 x 4 is fine
    assert config_from_dict({"train": {"global_batch": 12, "micro_batch": 4}}).train.global_batch == 12


@pytest.mark.parametrize(
    "tables, key",
    [
        ({"train": {"device": "tpu"}}, "train.device"),
        ({"train": {"threads": -1}}, "train.threads"),
        ({"train": {"min_lr_ratio": 1.5}}, "train.min_lr_ratio"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"checkpoint": {"keep": 0}}, "checkpoint.keep"),
        ({"checkpoint": {"on_error": "ignore"}}, "checkpoint.on_error"),
        ({"faults": {"inject_kill_in_save_at_step": -1}}, "faults.inject_kill_in_save_at_step"),
        ({"eval": {"sample_tokens": -1}}, "eval.sample_tokens"),
        ({"log": {"interval": 0}}, "log.interval"),
        ({"data": {"val_fraction": 0.5}}, "data.val_fraction"),
        ({"data": {"val_fraction": 0.0}}, "data.val_fraction"),
    ],
)
def test_other_sections_validated(tables, key):
    """Out-of-range values in the other sections are UserErrors naming the key."""
    assert key in user_error(config_from_dict, tables)


def test_dense_model_is_valid():
    """n_experts = top_k = 1 (a dense model) passes validation."""
    config = config_from_dict({"model": {"n_experts": 1, "top_k": 1}})
    assert not config.model.is_moe


def test_every_user_error_is_one_line(tmp_path: Path):
    """All the mistakes above produce single-line messages (the CLI prints them without a traceback)."""
    broken = tmp_path / "broken.toml"
    broken.write_text("x = [1,\n")
    cases = [
        lambda: config_from_dict({"model": {"n_layer": 3}}),
        lambda: config_from_dict({"modle": {}}),
        lambda: config_from_dict({"model": {"n_layers": "4"}}),
        lambda: config_from_dict({"model": {"d_model": 100, "n_heads": 3}}),
        lambda: config_from_dict({"model": {"preset": "nope"}}),
        lambda: config_from_dict({"train": {"global_batch": 10, "micro_batch": 4}}),
        lambda: config_from_dict({"train": {"min_lr_ratio": 2.0}}),
        lambda: config_from_dict({"model": {"embedding_multiplier": float("nan")}}),
        lambda: load_config(tmp_path / "missing.toml"),
        lambda: load_config(broken),
        lambda: parse_override("nothing"),
    ]
    for case in cases:
        message = user_error(case)
        assert message and "\n" not in message, message


@pytest.mark.parametrize(
    "tables",
    [
        {"model": {"n_layers": "4\n"}},  # e.g. a TOML multi-line string """4\n"""
        {"model": {"n_layers\nx": 4}},  # a quoted TOML key with an escaped newline
        {"mo\ndel": {}},
    ],
    ids=["value", "key", "section"],
)
def test_user_error_one_line_even_with_newlines_in_input(tables):
    """User-supplied text is quoted (repr) in messages, so a newline in it cannot break the one-line
    contract. BUG: _coerce, _build_section and config_from_dict interpolate it raw."""
    message = user_error(config_from_dict, tables)
    assert "\n" not in message, message


@pytest.mark.parametrize(
    "tables",
    [
        {"train": {"lr": float("nan")}},
        {"model": {"capacity_factor": float("nan")}},
        {"model": {"attn_softcap": float("inf")}},
    ],
    ids=["lr-nan", "capacity-nan", "softcap-inf"],
)
def test_non_finite_numbers_rejected(tables):
    """NaN/inf pass the `value <= 0` / `value < 0` checks (every comparison with NaN is False), so a
    NaN learning rate or an infinite soft-cap (which makes attention NaN: inf * tanh(0)) is accepted.
    BUG: validation should reject non-finite floats."""
    user_error(config_from_dict, tables)


# ------------------------------------------------------------------------------------ Grok-1


def test_grok1_preset_matches_reference():
    """The grok-1 preset reproduces every architectural number in shared/reference/grok1.md."""
    g = get_preset("grok-1")
    assert (g.n_layers, g.d_model, g.n_heads, g.n_kv_heads, g.head_dim) == (64, 6144, 48, 8, 128)
    assert g.n_heads * g.head_dim == g.d_model  # 48 * 128 = 6144
    # ffn size = int(8 * 6144) * 2 // 3 rounded up to a multiple of 8 = 32768
    ffn = int(8 * 6144) * 2 // 3
    ffn = -(-ffn // 8) * 8
    assert g.ffn_dim == ffn == 32768
    assert g.vocab_size == 131072 == 128 * 1024
    assert g.seq_len == 8192
    assert (g.n_experts, g.top_k) == (8, 2)
    assert g.ffn_type == "geglu" and g.norm == "sandwich"
    assert g.attn_softcap == 30.0
    assert g.embedding_multiplier == pytest.approx(78.38367176906169, rel=1e-15)
    assert g.embedding_multiplier == pytest.approx(math.sqrt(6144), rel=1e-15)
    assert g.output_multiplier == pytest.approx(1 / math.sqrt(3), rel=1e-15)
    assert g.rope_base == 10000.0
    assert g.norm_eps == 1e-5
    assert g.tie_embeddings is True
    assert g.router_renormalize is False  # gates are the plain softmax probabilities


def test_grok1_reference_numbers_present():
    """The reference file itself states the numbers the preset test relies on (guards a stale copy)."""
    if not REFERENCE.is_file():
        pytest.skip("shared/reference/grok1.md not available")
    text = REFERENCE.read_text()
    for fact in ("64 layers", "6,144", "48 query heads", "8 key/value heads", "head dim 128", "32,768",
                 "131,072", "8,192", "8 experts, top-2", "30·tanh", "78.38367176906169", "0.5773502691896257",
                 "base 10,000", "sandwich", "GeGLU"):
        assert fact in text, fact


# ------------------------------------------------------------------------------------ round trip


def test_config_to_toml_round_trips():
    """A non-default RunConfig written as TOML reads back (tomllib + config_from_dict) to an equal one."""
    config = config_from_dict(
        {
            "model": {"preset": "small", "n_layers": 3, "ffn_type": "swiglu", "norm": "pre",
                      "router_renormalize": True, "capacity_factor": 1.25, "attn_softcap": 0.0},
            "data": {"source": "/tmp/some corpus", "tokenizer": "bpe", "val_fraction": 0.05},
            "train": {"steps": 17, "global_batch": 12, "micro_batch": 3, "lr": 1e-4, "compile": True},
            "eval": {"sample_prompt": 'print("héllo")\n'},
            "log": {"tensorboard": False},
        }
    )
    text = config_to_toml(config)
    tables = tomllib.loads(text)
    assert tables == config_to_dict(config)
    again = config_from_dict(tables)
    assert again == config
    assert again.model.name == "small-custom"
    assert again.eval.sample_prompt == 'print("héllo")\n'


def test_round_trip_of_grok1_preserves_float_multipliers():
    """Irrational floats (sqrt(6144), 1/sqrt(3)) survive the TOML round trip bit for bit."""
    config = RunConfig(model=get_preset("grok-1"))
    again = config_from_dict(tomllib.loads(config_to_toml(config)))
    assert again.model.embedding_multiplier == config.model.embedding_multiplier
    assert again.model.output_multiplier == config.model.output_multiplier
    assert again == config


def test_model_config_is_moe():
    """is_moe is true exactly when there is more than one expert."""
    assert ModelConfig(n_experts=8).is_moe
    assert not ModelConfig(n_experts=1, top_k=1).is_moe
    assert dataclasses.replace(ModelConfig(), n_experts=2).is_moe


def test_shipped_tiny_config_is_the_default_run() -> None:
    """configs/tiny.toml writes out exactly what `colossus train` does with no arguments."""
    from conftest import REPO

    assert load_config(REPO / "configs" / "tiny.toml") == load_config(None)


@pytest.mark.parametrize("key, value, new", [
    ("reshard_after_forward", False, "parallel.zero"),
    ("activation_checkpoint", "full", "parallel.recompute"),
    ("ac_every", 2, "parallel.recompute_every"),
])
def test_renamed_parallel_keys_name_the_new_spelling(key, value, new):
    message = user_error(config_from_dict, {"parallel": {key: value}})
    assert message.startswith(f"config key parallel.{key} is now {new}") and "\n" not in message


@pytest.mark.parametrize("tables, words", [
    ({"parallel": {"recompute": "blocks"}}, ["parallel.recompute='blocks'", "none, selective, full"]),
    ({"parallel": {"zero": 4}}, ["parallel.zero=4", "ZeRO stage"]),
    ({"parallel": {"pp": 0}}, ["parallel.pp", "positive"]),
    ({"parallel": {"pp_schedule": "gpipe"}}, ["parallel.pp_schedule='gpipe'", "1f1b"]),
    ({"train": {"precision": "fp16"}}, ["train.precision='fp16'", "fp32, bf16, fp8"]),
])
def test_layout_keys_are_checked(tables, words):
    message = user_error(config_from_dict, tables)
    assert all(word in message for word in words), message


def test_layout_from_config_and_back():
    """layout_tables is the inverse of layout_from_config: a plan's layout written as config values
    comes back as the same Layout."""
    from colossus.config import layout_from_config, layout_tables
    from colossus.layout import Layout

    layout = Layout(tp=2, pp=2, vpp=2, cp=2, ep=2, dp_replicate=2, dp_shard=3, zero=2, mbs=2, gbs=96,
                    recompute="selective", recompute_every=2, precision="bf16", pp_schedule="interleaved-1f1b")
    config = config_from_dict(layout_tables(layout))
    assert layout_from_config(config, layout.world_size, "cpu") == layout
    assert layout_from_config(config_from_dict({}), 1, "cuda").precision == "bf16"  # auto: the device's
    # 2 ranks sharing the default batch of 8 in micro-batches of 8: each runs its 4 as one micro-batch
    halves = layout_from_config(config_from_dict({}), 2, "cpu")
    assert (halves.mbs, halves.micro_batches) == (4, 1)
    assert layout_from_config(config_from_dict({}), 1, "cpu").precision == "fp32"
