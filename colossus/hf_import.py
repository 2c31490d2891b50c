"""`colossus import HF_DIR --out RUN`: a Hugging Face checkpoint (llama, mixtral or grok-1 layout) as a
Colossus run folder whose DCP checkpoint `train.init_from`, `colossus generate` and `--dry-run` accept.

RUN gets config.toml (its [model] read from config.json, its [parallel] from `--set parallel.*`), the
tokenizer, and checkpoints/step-0 holding each rank's shards of the model for that layout, written as
the trainer would write them: torch.distributed.checkpoint's own planner lays out every rank's shards
(each rank's model is built on the meta device in a process of its own, under torch's fake process
group), and its FileSystemWriter writes them, one rank's file after another. Only the data comes from
elsewhere: a SavePlanner whose `resolve_data` reads each shard's region from the safetensors files
when the writer asks for it (DCP's hook for lazy data). Shards are cut into pieces of at most
PIECE_BYTES, each its own file, so converting Grok-1's 316B parameters holds one piece at a time,
never the model.

Like export, everything is written into a hidden folder beside RUN that is renamed at the end; a
failure leaves nothing behind, and an existing RUN is never touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from colossus.config import RunConfig, apply_overrides, config_from_dict, config_to_toml
from colossus.errors import UserError
from colossus.files import staged_folder, write_atomic
from colossus.hf import Weight, model_table, read_hf_config, weight_shapes, weights
from colossus.train.checkpoint import MODEL_KEY

PIECE_BYTES = 64 * 2**20  # the most one write holds (DCP's writer adds about one copy while serialising)
PREFIX = f"{MODEL_KEY}.model."  # where the trainer's checkpoints keep the model
INDEX = "model.safetensors.index.json"


class HFCheckpoint:
    """The safetensors files of a Hugging Face folder: which file holds each tensor, and its shape.
    Each read opens its file and reads only the region asked for."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            try:
                files = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
                raise UserError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc})") from None
        elif (folder / "model.safetensors").is_file():
            files = None
        else:
            raise UserError(f"{folder} has neither {INDEX} nor model.safetensors; give a Hugging Face model folder")
        self.file: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        for name in sorted(set(files.values())) if files else ["model.safetensors"]:
            path = folder / name
            if not path.is_file():
                raise UserError(f"shard {path} is missing (listed in {index}); copy the whole checkpoint folder")
            try:
                with safe_open(str(path), framework="pt", backend="pread") as handle:
                    for key in handle.keys():
                        self.file[key] = name
                        self.shape[key] = tuple(handle.get_slice(key).get_shape())
            except Exception as exc:  # safetensors raises its own error types for damaged headers
                raise UserError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        for key, name in (files or {}).items():
            if self.file.get(key) != name:
                raise UserError(f"{folder / name} lacks tensor {key}, which {index} places there; the file is "
                                "damaged or from another checkpoint")

    def read(self, name: str, region: list[slice]) -> torch.Tensor:
        from safetensors import safe_open

        # pread, not mmap: torch maps a file privately, and a mapping of a whole shard would count
        # against the process's memory however little of it is read
        with safe_open(str(self.folder / self.file[name]), framework="pt", backend="pread") as handle:
            return handle.get_slice(name)[tuple(region)].to(torch.float32)

    def check(self, table: list[Weight], shapes: dict[str, tuple[int, ...]], arch: str) -> None:
        """Every tensor the layout needs is there with the model's shape, and nothing else is."""
        expected, optional = {}, set()
        for weight in table:
            for name in weight.names():
                expected[name] = weight.their_shape(shapes[weight.ours])
            if weight.copy:  # a tied output: released checkpoints may leave it out
                optional.add(weight.theirs)
        for name, shape in expected.items():
            if name not in self.shape and name not in optional:
                raise UserError(f"{self.folder} has no tensor {name}, which the {arch} layout of this config.json needs; "
                                "the checkpoint is incomplete")
            if name in self.shape and self.shape[name] != shape:
                raise UserError(f"tensor {name} in {self.folder / self.file[name]} has shape {list(self.shape[name])}, "
                                f"but config.json gives {list(shape)}; the checkpoint and its config.json disagree")
        extra = sorted(set(self.shape) - set(expected))
        if extra:
            raise UserError(f"tensor {extra[0]} in {self.folder / self.file[extra[0]]} has no place in the {arch} layout"
                            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; Colossus would drop it")

    def region(self, weight: Weight, offsets: list[int], sizes: list[int]) -> torch.Tensor:
        """The part [offsets, offsets + sizes) of Colossus's weight, as fp32 (experts transposed back)."""
        region = [slice(o, o + s) for o, s in zip(offsets, sizes)]
        if not weight.experts:
            return self.read(weight.theirs, region)
        experts, rows, cols = region  # ours [experts, in, out]; theirs each [out, in]
        stacked = torch.empty(sizes)  # filled expert by expert: one expert's part is all that is extra
        for e in range(experts.start, experts.stop):
            stacked[e - experts.start] = self.read(weight.theirs.format(e=e), [cols, rows]).t()
        return stacked

    def same(self, a: str, b: str) -> bool:
        """Whether two tensors are equal, compared a block of rows at a time."""
        rows = self.shape[a][0]
        step = max(1, PIECE_BYTES // (4 * max(1, math.prod(self.shape[a][1:]))))
        blocks = [[slice(r, min(r + step, rows))] for r in range(0, rows, step)]
        return all(torch.equal(self.read(a, block), self.read(b, block)) for block in blocks)


def pieces(item, limit: int) -> list:
    """A DCP WriteItem cut along its outer dimensions into pieces of at most `limit` bytes (one piece
    where it fits). Each piece is a chunk of its own in the checkpoint's metadata; a load assembles
    whatever chunks overlap what it needs, so any layout still reads it."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    data = item.tensor_data
    if data is None:
        return [item]
    regions = _split(list(data.chunk.offsets), list(data.chunk.sizes), data.properties.dtype.itemsize, limit, 0)
    if len(regions) == 1:
        return [item]
    return [WriteItem(index=MetadataIndex(item.index.fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                                                  data.properties, data.size))
            for offsets, sizes in regions]


def _split(offsets: list[int], sizes: list[int], itemsize: int, limit: int, dim: int) -> list[tuple[list[int], list[int]]]:
    """The region cut along `dim` (and, where one index of it is still too large, the dimensions after it)."""
    if math.prod(sizes) * itemsize <= limit or dim >= len(sizes):
        return [(offsets, sizes)]
    slab = math.prod(sizes[dim + 1:]) * itemsize  # the bytes of one index of `dim`

    def at(start: int, length: int) -> tuple[list[int], list[int]]:
        return (offsets[:dim] + [offsets[dim] + start] + offsets[dim + 1:], sizes[:dim] + [length] + sizes[dim + 1:])

    if slab <= limit:
        step = limit // slab
        return [at(start, min(step, sizes[dim] - start)) for start in range(0, sizes[dim], step)]
    return [piece for start in range(sizes[dim]) for piece in _split(*at(start, 1), itemsize, limit, dim + 1)]


def rank_plan(config: RunConfig, world_size: int, rank: int, limit: int):
    """The DCP save plan of `rank`'s model shards under the config's layout (run in a process of its own:
    torch keeps meshes per process, and each rank must see only its own)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from colossus.models.grok import build_model
    from colossus.parallel.mesh import build_mesh
    from colossus.parallel.parallelize import parallelize
    from colossus.parallel.pipeline import to_saved
    from colossus.parallel.runtime import resolve_layout
    from colossus.train.trainer import STATE_OPTIONS

    layout = resolve_layout(config, world_size, "cpu")
    if world_size > 1:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # torch's fake process group

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        model = build_model(config.model, "meta")
        parallelize(model, layout, build_mesh(layout, "cpu") if world_size > 1 else None, torch.device("cpu"))
        state = {MODEL_KEY: {"model": to_saved(model, get_model_state_dict(model, options=STATE_OPTIONS))}}
        planner = DefaultSavePlanner()
        planner.set_up_planner(state_dict=state, storage_meta=None, is_coordinator=rank == 0)
        plan = planner.create_local_plan()
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    return dataclasses.replace(plan, items=[piece for item in plan.items for piece in pieces(item, limit)])


def rank_plans(config: RunConfig, world_size: int, limit: int) -> list:
    """Every rank's save plan, each made by `rank_plan` in a Python process of its own: torch keeps device
    meshes per process, and under the fake process group a mesh built for one rank is reused for the next."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}

    def plan(rank: int):
        with tempfile.TemporaryDirectory(prefix="colossus-import-") as folder:
            job = Path(folder) / "job.pickle"
            job.write_bytes(pickle.dumps((config, world_size, rank, limit)))
            done = subprocess.run([sys.executable, "-c", "import sys; from colossus.hf_import import plan_main; "
                                   "plan_main(sys.argv[1])", str(job)], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"planning the shards of rank {rank} failed: {done.stderr.strip()[-2000:]}")
            return pickle.loads(job.read_bytes())

    with ThreadPoolExecutor(max_workers=min(world_size, os.cpu_count() or 1)) as pool:
        return list(pool.map(plan, range(world_size)))


def plan_main(job: str) -> None:
    """The body of a planning process: read (config, world size, rank, limit), write back the plan."""
    config, world_size, rank, limit = pickle.loads(Path(job).read_bytes())
    Path(job).write_bytes(pickle.dumps(rank_plan(config, world_size, rank, limit)))


def _reader_planner(checkpoint: HFCheckpoint, table: dict[str, Weight]):
    from torch.distributed.checkpoint import DefaultSavePlanner

    class FromSafetensors(DefaultSavePlanner):
        """DCP asks it for each piece's data just before writing it: read then, from the safetensors files."""

        def resolve_data(self, write_item):
            chunk = write_item.tensor_data.chunk
            weight = table[write_item.index.fqn.removeprefix(PREFIX)]
            return checkpoint.region(weight, list(chunk.offsets), list(chunk.sizes))

    return FromSafetensors()


def import_checkpoint(hf_dir: Path, out: Path, arch: str = "auto", overrides: list[str] | tuple[str, ...] = (),
                      world_size: int | None = None, piece_bytes: int = PIECE_BYTES) -> dict:
    """Write the Hugging Face checkpoint in `hf_dir` as the run folder `out`; returns what was written."""
    import torch.distributed.checkpoint as dcp

    from colossus.data.tokenizer import ByteTokenizer
    from colossus.export import tokenizer_json
    from colossus.parallel.runtime import resolve_layout
    from colossus.train.checkpoint import COMMITTED, write_manifest
    from colossus.train.trainer import config_hash

    if out.exists():
        raise UserError(f"{out} exists; give a new folder (import never writes into or over an existing one)")
    hf, arch = read_hf_config(hf_dir, arch)
    tables: dict = {"model": model_table(hf, arch, hf_dir / "config.json", hf_dir.resolve().name)}
    tokenizer = hf_dir / "tokenizer.json"
    byte_level = tokenizer.is_file() and tokenizer.read_text() == tokenizer_json(ByteTokenizer())
    if tokenizer.is_file() and not byte_level:
        tables["data"] = {"tokenizer": str(out.resolve() / "tokenizer.json")}
    config = config_from_dict(apply_overrides(tables, overrides))
    degrees = config.parallel
    size = world_size or (degrees.pp * degrees.dp_replicate * max(degrees.dp_shard, 1) * degrees.ep * degrees.cp
                          * degrees.tp)
    layout = resolve_layout(config, size, "cpu")  # a wrong layout fails here, before any file is read

    checkpoint = HFCheckpoint(hf_dir)
    table = weights(config.model, arch)
    shapes = weight_shapes(config.model)
    checkpoint.check(table, shapes, arch)
    copy = next((w for w in table if w.copy and w.theirs in checkpoint.shape), None)
    if copy is not None and not checkpoint.same(copy.theirs, "model.embed_tokens.weight"):
        raise UserError(f"{hf_dir / 'config.json'} says tie_word_embeddings=true but {copy.theirs} differs from "
                        "model.embed_tokens.weight; set it to false in config.json to keep both")

    plans = rank_plans(config, size, piece_bytes)

    with staged_folder(out) as staging:
        step = staging / "checkpoints" / "step-0"
        # A file per piece: DCP's writer keeps every tensor of a file until the file is closed.
        writer = dcp.FileSystemWriter(str(step), single_file_per_rank=False, thread_count=1)
        writer.set_up_storage_writer(True, rank=0)
        plans, metadata = dcp.DefaultSavePlanner().create_global_plan([writer.prepare_local_plan(p) for p in plans])
        reader = _reader_planner(checkpoint, {w.ours: w for w in table if not w.copy})
        results = []
        for plan in writer.prepare_global_plan(plans):  # one rank after another, each under its own file prefix
            written = writer.write_data(plan, reader)
            written.wait()
            results.append(written.value())
        writer.finish(metadata, results)
        write_manifest(step, 0, {"config_sha": config_hash(config), "imported_from": str(hf_dir.resolve()),
                                 "arch": arch})
        write_atomic(step / COMMITTED, "0\n")
        if tokenizer.is_file() and not byte_level:
            shutil.copyfile(tokenizer, staging / "tokenizer.json")
        write_atomic(staging / "config.toml", config_to_toml(config))
    return {"run": str(out), "arch": arch, "layout": layout.degrees(), "ranks": size,
            "files": sum(1 for path in (out / "checkpoints" / "step-0").iterdir() if path.suffix == ".distcp"),
            "tensors": len(checkpoint.shape), "tokenizer": config.data.tokenizer}
