"""Saving and loading row-sharded ID tables (model.id_tables=sharded) without any rank ever
holding a whole table.

In a training checkpoint every rank writes its own rows and their Adam moments::

    id-shards/rank00000.safetensors   param/<table>, exp_avg/<table>, exp_avg_sq/<table>; its
                                      metadata names each table's row range and Adam step

A resume on the same number of ranks reads each rank's own file (bitwise); on another number,
each rank reads the pieces of the saved files that overlap its new range (resharding), slice by
slice through safetensors' lazy reader.

The model state (id_tables.safetensors, the same file dense tables write) is assembled on rank
0 one shard at a time, streamed into the file, and read back by every rank as its own rows only.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from model.sharded_tables import row_range

SHARDS_DIR = "id-shards"


def shard_file(folder: Path, rank: int) -> Path:
    return Path(folder) / SHARDS_DIR / f"rank{rank:05d}.safetensors"


def save_shards(tables, optimizer, folder: Path, rank: int) -> None:
    """This rank's rows of every table, with their Adam moments, to folder/id-shards/."""
    tensors, meta = {}, {}
    for name, table in tables.items():
        state = optimizer.state_of(name)
        step = int(state["step"]) if state else 0
        tensors[f"param/{name}"] = table.shard.detach().contiguous()
        if step:  # a table that has not stepped has no moments yet
            tensors[f"exp_avg/{name}"] = state["exp_avg"].contiguous()
            tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].contiguous()
        meta[name] = {"start": table.start, "end": table.end, "num_rows": table.num_rows, "dim": table.dim,
                      "step": step}
    path = shard_file(folder, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"tables": json.dumps(meta)})


def _saved_ranges(folder: Path) -> list[tuple[Path, dict]]:
    files = sorted((Path(folder) / SHARDS_DIR).glob("rank*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder / SHARDS_DIR} holds no table shards: this checkpoint was saved with "
                                "model.id_tables=dense; resume it with dense tables")
    out = []
    for path in files:
        with safe_open(str(path), "pt") as f:
            out.append((path, json.loads(f.metadata()["tables"])))
    return out


def load_shards(tables, optimizer, folder: Path) -> None:
    """Every table's rows of this rank, and their Adam moments, from the saved rank files whose
    ranges overlap it, whatever number of ranks saved them."""
    saved = _saved_ranges(folder)
    for name, table in tables.items():
        first = saved[0][1][name]
        if (first["num_rows"], first["dim"]) != (table.num_rows, table.dim):
            raise ValueError(f"{folder}: table {name} was saved as {first['num_rows']} x {first['dim']}, "
                             f"this run has {table.num_rows} x {table.dim}")
        step = first["step"]
        values = {"param": table.shard.detach()}
        if step:
            values["exp_avg"], values["exp_avg_sq"] = torch.zeros_like(table.shard), torch.zeros_like(table.shard)
        covered = 0
        for path, meta in saved:
            lo, hi = max(meta[name]["start"], table.start), min(meta[name]["end"], table.end)
            if lo >= hi:
                continue
            with safe_open(str(path), "pt") as f:
                for kind, target in values.items():
                    piece = f.get_slice(f"{kind}/{name}")[lo - meta[name]["start"]:hi - meta[name]["start"]]
                    with torch.no_grad():
                        target[lo - table.start:hi - table.start] = piece
            covered += hi - lo
        if covered != table.end - table.start:
            raise ValueError(f"{folder}: the saved shards of {name} cover {covered} of this rank's "
                             f"{table.end - table.start} rows; the checkpoint is incomplete")
        if step:
            optimizer.set_state(name, step, values["exp_avg"], values["exp_avg_sq"])


def export_tables(tables, path: Path, rank: int, group=None) -> None:
    """Collective: the whole tables into one safetensors file on rank 0 (as dense tables are
    saved), received and written one shard at a time.

    Written field by field rather than with safetensors.torch.save_file, which needs every
    tensor in memory at once; the file is the same format and loads with safetensors."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    header, offset = {}, 0
    for name, table in tables.items():
        size = table.num_rows * table.dim * 4
        header[name] = {"dtype": "F32", "shape": [table.num_rows, table.dim], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    out = open(path, "wb") if rank == 0 else None
    try:
        if out is not None:
            out.write(struct.pack("<Q", len(text)) + text)
        for table in tables.values():
            for source in range(world):
                if source == rank == 0:
                    out.write(table.shard.detach().float().contiguous().numpy().tobytes())
                elif rank == 0:
                    start, end = row_range(table.num_rows, source, world)
                    piece = torch.empty(end - start, table.dim)
                    if end > start:
                        dist.recv(piece, group=group, group_src=source)
                    out.write(piece.numpy().tobytes())
                elif source == rank and table.end > table.start:
                    dist.send(table.shard.detach().float().contiguous(), group=group, group_dst=0)
    finally:
        if out is not None:
            out.close()


def load_table_rows(tables, path: Path) -> None:
    """Each table's rows of this rank from a saved id_tables.safetensors (dense or sharded)."""
    with safe_open(str(path), "pt") as f:
        for name, table in tables.items():
            shape = f.get_slice(name).get_shape()
            if list(shape) != [table.num_rows, table.dim]:
                raise ValueError(f"{path}: {name} has shape {tuple(shape)}, the model expects "
                                 f"{(table.num_rows, table.dim)}")
            with torch.no_grad():
                table.shard.copy_(f.get_slice(name)[table.start:table.end])
