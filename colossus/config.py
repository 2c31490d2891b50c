"""Typed configuration: one dataclass per TOML table, loading, `--set` overrides and validation.

A run is described by a TOML file whose tables match the dataclasses below ([model], [data],
[train], [checkpoint], [eval], [log]). Every mistake (unknown key, wrong type, impossible shape)
becomes a one-line UserError naming the key and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from colossus.errors import UserError
from colossus.layout import Layout, check_value
from colossus.modelconfig import FFN_TYPES, MOE_BALANCE, NORM_PLACEMENTS, ModelConfig
from colossus.models.presets import get_preset

@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib", a folder, a glob, or .txt/.jsonl/.parquet files
    text_field: str = "text"  # the field holding the text in JSONL / Parquet records
    tokenizer: str = "byte"  # "byte", "bpe" (trained here, cached) or a path to a tokenizer.json
    val_fraction: float = 0.01
    cache_dir: str = ""  # "" = $XDG_CACHE_HOME/colossus or ~/.cache/colossus
    prefetch: int = 2  # training batches built ahead in a background thread (pinned for a GPU); 0 = none


@dataclass
class TrainConfig:
    steps: int = 150
    global_batch: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 8  # sequences per forward/backward; the rest is gradient accumulation
    lr: float = 6e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 15
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    compile: bool = False
    deterministic: bool = False  # GPU: deterministic kernels, so reruns and resumes match bit for bit (slower); CPU kernels already are
    threads: int = 0  # CPU threads per process; 0 = all cores divided by local ranks
    precision: str = "auto"  # fp32 or bf16 (autocast, FSDP mixed precision, ledger, planner); auto: fp32 on a CPU, bf16 on a GPU
    init_from: str = ""  # fine-tune: start from the model weights of this run folder's newest checkpoint


@dataclass
class CheckpointConfig:
    interval: int = 50  # steps between checkpoints; a final one is always written
    keep: int = 3  # complete checkpoints to keep (the newest is never deleted)
    async_save: bool = True  # write in the background; training blocks only while the state is copied
    on_error: str = "continue"  # a save that fails (disk full, ...): "continue" training, or "stop" the run


@dataclass
class EvalConfig:
    interval: int = 50  # steps between validation passes; one is always run at the end
    batches: int = 8  # validation batches of train.global_batch sequences
    sample_tokens: int = 200  # tokens generated at the end of the run (0 = none)
    sample_prompt: str = "def "


@dataclass
class LogConfig:
    interval: int = 10  # steps between metrics lines
    tensorboard: bool = True
    state_digest: bool = False  # add a sha256 of this rank's weights and optimizer state to each metrics line


@dataclass
class ParallelConfig:
    """The parallel layout (colossus.layout.Layout says what each key means; the planner uses the same
    words). World size = pp x dp_replicate x dp_shard x ep x cp x tp."""

    dp_replicate: int = 1  # replicas that shard nothing between them (HSDP's outer dimension)
    dp_shard: int = -1  # ranks that shard what `zero` says; -1 = the rest of the world size
    tp: int = 1  # tensor (and sequence) parallel ranks, inside a node
    ep: int = 1  # expert-parallel ranks (data-parallel ranks too)
    cp: int = 1  # context-parallel ranks: each sequence split over them
    pp: int = 1  # pipeline stages
    vpp: int = 1  # virtual stages per pipeline rank (interleaved schedules)
    pp_schedule: str = "1f1b"  # 1f1b, interleaved-1f1b (vpp >= 2) or zbv (zero bubble, vpp = 2)
    pp_layers: list[int] = field(default_factory=list)  # blocks per stage, first to last; [] = balanced
    zero: int = 3  # ZeRO stage over the shard ranks: 3 weights too (FSDP resharding after forward), 1-2 no, 0 nothing
    recompute: str = "none"  # activation recomputation: none, selective (the attention core) or full (whole blocks)
    recompute_every: int = 1  # recompute only every k-th block (1 = all)


# Keys that were renamed: an old config stops with one line naming the new key.
RENAMED = {
    "parallel.reshard_after_forward": "parallel.zero (3 reshards after the forward, as true did; 2 keeps the "
                                      "gathered weights, as false did)",
    "parallel.activation_checkpoint": "parallel.recompute (none; selective = the attention core; full = whole "
                                      "blocks), with parallel.recompute_every for every k-th block",
    "parallel.ac_every": "parallel.recompute_every (with parallel.recompute = full for whole blocks)",
}


@dataclass
class FaultsConfig:
    max_bad_steps: int = 3  # consecutive non-finite steps before rolling back to the last checkpoint
    hang_timeout_s: float = 1800.0  # exit (for the launcher to restart) after this long without progress; 0 = off
    inject_nan_at_step: int = 0  # testing: poison the loss of this step (0 = never), once per process
    inject_nan_count: int = 1  # testing: how many consecutive steps to poison
    # testing: SIGKILL rank 0 once every rank's files of this step's checkpoint are written but before
    # it is committed (0 = never); only in a run's first attempt (TORCHELASTIC_RESTART_COUNT unset or 0)
    inject_kill_in_save_at_step: int = 0
    # Fault-tolerant replica groups (torchft): the outer data-parallel dimension, dp_replicate, split into
    # this many groups, each its own torchrun job; a group that fails restarts and takes the current state
    # from a live peer while the others keep training. 0 = off (one job, a failure restarts everything).
    replica_groups: int = 0
    replica_group: int = -1  # which group this job is, 0 .. replica_groups - 1 (colossus launch sets it)
    lighthouse: str = ""  # the torchft Lighthouse, host:port or http://host:port; "" = $TORCHFT_LIGHTHOUSE
    min_replicas: int = 1  # a step commits only with at least this many groups in it
    # A cross-group collective gives up after this (NCCL notices a dead peer no sooner; gloo at once), and
    # the step runs again without the dead group. 10 s is torchtitan's torchft default
    # (fault_tolerance.process_group_timeout_ms); a step's gradient all-reduce must fit in it.
    replica_timeout_s: float = 10.0
    # testing: a replica group restarted once SIGKILLs itself 50 ms into receiving a live peer's state
    inject_kill_in_recovery: bool = False


@dataclass
class LedgerConfig:
    usd_per_device_hour: float = -1.0  # price of a GPU (or a CPU process) hour; -1 = $2 per GPU, $0.04 per CPU thread
    device_power_w: float = 0.0  # average draw per device; 0 = the GPU's TDP, or 10 W per CPU thread
    pue: float = 1.0  # facility overhead on the energy figure
    thresholds_file: str = ""  # more thresholds (TOML [[threshold]] tables), added to the built-in ones
    stop_at_threshold: str = ""  # stop (with a checkpoint) before this threshold's compute is exceeded


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(RunConfig)}
_SECTION_TYPES = typing.get_type_hints(RunConfig)


# ---------------------------------------------------------------------------------------- loading


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _printable(text: str) -> str:
    """User text for a one-line message: as typed when printable, else its repr (no raw newlines)."""
    return text if text.isprintable() else repr(text)


def _coerce(where: str, value: Any, kind: type) -> Any:
    """Check one value against its declared type; ints are accepted where floats are expected."""
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list):
            raise UserError(f"config key {where} must be a list of {_KIND_NAMES[item].removeprefix('an ').removeprefix('a ')}s, "
                            f"e.g. [3, 3, 2], got {value!r}")
        return [_coerce(f"{where}[{index}]", v, item) for index, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        shown = f"'{value}'" if isinstance(value, str) and value.isprintable() else repr(value)
        raise UserError(
            f"config key {where} must be {_KIND_NAMES[kind]}, got {shown} ({type(value).__name__})"
        )
    return float(value) if kind is float else value


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _build_section(name: str, values: dict[str, Any], base: Any) -> Any:
    cls = type(base)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    updates = {}
    for key, value in values.items():
        if f"{name}.{key}" in RENAMED:
            raise UserError(f"config key {name}.{key} is now {RENAMED[f'{name}.{key}']}")
        if key not in hints:
            raise UserError(f"unknown config key {name}.{_printable(key)}{_suggest(key, known)}; known keys: {', '.join(known)}")
        updates[key] = _coerce(f"{name}.{key}", value, hints[key])
    return dataclasses.replace(base, **updates)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse one `--set section.key=value`; the value is read as TOML (numbers, true/false,
    quoted strings), and anything TOML cannot read is taken as a plain string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. --set train.steps=100")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def config_from_dict(tables: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from TOML-shaped tables. A [model] `preset` key starts the
    model from a named preset; the other [model] keys then override its fields."""
    config = RunConfig()
    for name, values in tables.items():
        if name not in SECTIONS:
            raise UserError(f"unknown config section [{_printable(name)}]{_suggest(name, list(SECTIONS))}; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"config section [{name}] must be a table of keys, got {values!r}")
        values = dict(values)
        base = getattr(config, name)
        if name == "model" and "preset" in values:
            preset = _coerce("model.preset", values.pop("preset"), str)
            base = get_preset(preset)
            if "name" not in values and values:
                values["name"] = f"{preset}-custom"
        setattr(config, name, _build_section(name, values, base))
    validate(config)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML file (optional), apply `section.key=value` overrides, validate."""
    tables: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found; pass an existing .toml file or none for the defaults")
        try:
            tables = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    return config_from_dict(apply_overrides(tables, overrides))


def apply_overrides(tables: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`tables` (TOML-shaped, changed in place and returned) with each `section.key=value` set."""
    for text in overrides:
        section, key, value = parse_override(text)
        table = tables.setdefault(section, {})
        if not isinstance(table, dict):
            raise UserError(f"--set {text!r}: [{section}] is not a table in the config")
        table[key] = value
    return tables


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_to_toml(config: RunConfig) -> str:
    return tomli_w.dumps(config_to_dict(config))


# ------------------------------------------------------------------------------------- validation


def _positive(where: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"config key {where} must be positive, got {value}")


def validate_model(m: ModelConfig) -> None:
    for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "n_experts", "top_k", "vocab_size", "seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    if m.d_model % m.n_heads:
        raise UserError(f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; pick a head count that divides it")
    if m.n_heads % m.n_kv_heads:
        raise UserError(f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}; grouped-query attention needs whole groups")
    if m.top_k > m.n_experts:
        raise UserError(f"model.top_k={m.top_k} is larger than model.n_experts={m.n_experts}; use top_k <= n_experts")
    if m.head_dim % 2:
        raise UserError(f"model.head_dim={m.head_dim} must be even for rotary embeddings")
    if m.ffn_type not in FFN_TYPES:
        raise UserError(f"model.ffn_type={m.ffn_type!r} is not one of {', '.join(FFN_TYPES)}")
    if m.norm not in NORM_PLACEMENTS:
        raise UserError(f"model.norm={m.norm!r} is not one of {', '.join(NORM_PLACEMENTS)}")
    if m.moe_balance not in MOE_BALANCE:
        raise UserError(f"model.moe_balance={m.moe_balance!r} is not one of {', '.join(MOE_BALANCE)}")
    for key in ("attn_softcap", "moe_aux_loss_coef", "moe_z_loss_coef", "capacity_factor", "moe_bias_rate"):
        if getattr(m, key) < 0:
            raise UserError(f"config key model.{key} must be >= 0, got {getattr(m, key)}")


def validate(config: RunConfig) -> None:
    for section in SECTIONS:
        table = getattr(config, section)
        for f in dataclasses.fields(table):
            value = getattr(table, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"config key {section}.{f.name} must be a finite number, got {value}")
    validate_model(config.model)
    t = config.train
    for key in ("steps", "global_batch", "micro_batch", "lr"):
        _positive(f"train.{key}", getattr(t, key))
    if t.global_batch % t.micro_batch:
        raise UserError(
            f"train.micro_batch={t.micro_batch} does not divide train.global_batch={t.global_batch}; "
            "the global batch is split into equal micro-batches"
        )
    if t.warmup_steps < 0 or not 0 <= t.min_lr_ratio <= 1 or t.grad_clip < 0 or t.weight_decay < 0:
        raise UserError("train.warmup_steps, train.grad_clip and train.weight_decay must be >= 0 and train.min_lr_ratio in [0, 1]")
    if t.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"train.device={t.device!r} is not one of auto, cpu, cuda")
    if t.threads < 0:
        raise UserError(f"train.threads must be >= 0, got {t.threads}")
    _positive("checkpoint.interval", config.checkpoint.interval)
    _positive("checkpoint.keep", config.checkpoint.keep)
    if config.checkpoint.on_error not in ("continue", "stop"):
        raise UserError(f"checkpoint.on_error={config.checkpoint.on_error!r} is not one of continue, stop")
    _positive("eval.interval", config.eval.interval)
    _positive("eval.batches", config.eval.batches)
    if config.eval.sample_tokens < 0:
        raise UserError(f"eval.sample_tokens must be >= 0, got {config.eval.sample_tokens}")
    _positive("log.interval", config.log.interval)
    p = config.parallel
    if p.dp_shard == 0 or p.dp_shard < -1:
        raise UserError(f"parallel.dp_shard must be -1 (the rest of the world size) or positive, got {p.dp_shard}")
    for key in ("dp_replicate", "tp", "ep", "cp", "pp", "vpp", "zero", "recompute", "recompute_every", "pp_schedule",
                "pp_layers"):
        check_value(key, getattr(p, key), f"parallel.{key}")
    if t.precision != "auto":
        check_value("precision", t.precision, "train.precision")
    f = config.faults
    _positive("faults.max_bad_steps", f.max_bad_steps)
    if f.hang_timeout_s < 0 or f.inject_nan_at_step < 0 or f.inject_nan_count < 1 or f.inject_kill_in_save_at_step < 0:
        raise UserError("faults.hang_timeout_s, faults.inject_nan_at_step and faults.inject_kill_in_save_at_step "
                        "must be >= 0 and faults.inject_nan_count >= 1")
    check_replica_groups(config)
    ledger = config.ledger
    if ledger.usd_per_device_hour < 0 and ledger.usd_per_device_hour != -1:
        raise UserError(f"ledger.usd_per_device_hour must be >= 0 (or -1 for the default), got {ledger.usd_per_device_hour}")
    if ledger.device_power_w < 0 or ledger.pue < 1:
        raise UserError("ledger.device_power_w must be >= 0 and ledger.pue >= 1")
    if config.data.prefetch < 0:
        raise UserError(f"data.prefetch must be >= 0 (batches built ahead; 0 turns it off), got {config.data.prefetch}")
    if not 0 < config.data.val_fraction < 0.5:
        raise UserError(f"data.val_fraction must be in (0, 0.5), got {config.data.val_fraction}")


def check_replica_groups(config: RunConfig) -> None:
    """[faults] replica_groups against the rest of the config: the groups split dp_replicate and the batch."""
    f, p = config.faults, config.parallel
    if f.replica_groups < 0:
        raise UserError(f"faults.replica_groups must be >= 0 (0 = off), got {f.replica_groups}")
    if f.replica_groups == 0:
        return
    if p.dp_replicate % f.replica_groups:
        raise UserError(f"faults.replica_groups = {f.replica_groups} does not fit parallel.dp_replicate = {p.dp_replicate}: "
                        f"each group is dp_replicate / replica_groups replicas; set parallel.dp_replicate to a multiple "
                        f"of {f.replica_groups}")
    if config.train.global_batch % f.replica_groups:
        raise UserError(f"train.global_batch = {config.train.global_batch} does not split over faults.replica_groups = "
                        f"{f.replica_groups}; pick a multiple of {f.replica_groups}")
    if not 0 <= f.replica_group < f.replica_groups:
        raise UserError(f"faults.replica_group = {f.replica_group} is not one of the {f.replica_groups} groups; set it "
                        f"to 0 .. {f.replica_groups - 1} for each group's job (colossus launch --replica-groups does)")
    if not 1 <= f.min_replicas <= f.replica_groups:
        raise UserError(f"faults.min_replicas = {f.min_replicas} must be 1 .. faults.replica_groups ({f.replica_groups})")
    if f.replica_timeout_s <= 0:
        raise UserError(f"faults.replica_timeout_s must be > 0, got {f.replica_timeout_s}")


# ------------------------------------------------------------------------ the layout a config describes


def resolve_precision(precision: str, device_type: str) -> str:
    """train.precision with auto resolved: bf16 on a GPU, fp32 on a CPU (whose fp32 matmuls are the
    fast ones unless it has AMX or AVX-512 BF16)."""
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" else "fp32"


def layout_from_config(config: RunConfig, world_size: int, device_type: str = "cpu") -> Layout:
    """The Layout a run config describes on `world_size` processes: dp_shard = -1 takes the rest of the
    world size (dp_replicate does under parallel.zero = 0, which shards nothing), and train.precision
    auto becomes the device's. The product may still differ from world_size: the trainer says so."""
    p, t = config.parallel, config.train
    dp_replicate, dp_shard = p.dp_replicate, p.dp_shard
    fixed = p.pp * p.ep * p.cp * p.tp
    if dp_shard == -1:
        if p.zero == 0:
            dp_shard = 1
            dp_replicate = max(1, world_size // fixed) if p.dp_replicate == 1 else p.dp_replicate
        else:
            dp_shard = max(1, world_size // (fixed * dp_replicate))
    # A data-parallel rank whose share of the batch is smaller than train.micro_batch runs it as one micro-batch.
    share = t.global_batch // max(1, dp_replicate * dp_shard * p.ep)
    return Layout(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, dp_replicate=dp_replicate, dp_shard=dp_shard,
                  zero=p.zero, mbs=min(t.micro_batch, max(share, 1)), gbs=t.global_batch, recompute=p.recompute,
                  recompute_every=p.recompute_every, precision=resolve_precision(t.precision, device_type),
                  pp_schedule=p.pp_schedule, pp_layers=tuple(p.pp_layers))


def layout_tables(layout: Layout) -> dict[str, dict[str, Any]]:
    """The config values that describe `layout` (the inverse of layout_from_config): its [parallel]
    table and the batch and precision keys of [train]. The one translation from a plan to a run."""
    parallel = {name: getattr(layout, name) for name in (
        "dp_replicate", "dp_shard", "tp", "ep", "cp", "pp", "vpp", "pp_schedule", "zero", "recompute", "recompute_every")}
    if layout.pp_layers:
        parallel["pp_layers"] = list(layout.pp_layers)
    return {"parallel": parallel,
            "train": {"global_batch": layout.gbs, "micro_batch": layout.mbs, "precision": layout.precision}}
