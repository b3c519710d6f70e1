"""Initial weights drawn per shard: any box equals the same box of the full draw, at about its own cost.

No process group: shards come from ``shard_indices`` with explicit mesh coordinates, the way DTensor
places them (checked against DTensor's own shape/offset computation).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from triarch.parallel.init import full_init_value, init_box, local_init_value, runs, shard_indices
from triarch.parallel.tiled_normal import TILE_MATRIX, TILE_VECTOR, full_standard_normal, standard_normal_box

SEED = 7
INIT = {"seed": SEED, "std": 0.02, "n_layers": 4}
WQ = "layers.0.attention.wq.weight"

BOXES_2D = [
    ((0, 300), (0, 700)),  # whole
    ((0, 64), (0, 256)),  # one tile
    ((10, 37), (250, 299)),  # inside, across a column edge
    ((63, 65), (255, 257)),  # four tiles, one element each side
    ((299, 300), (699, 700)),  # last element (cut edge tile)
    ((128, 192), (0, 700)),  # whole rows, tile aligned
    ((5, 5), (0, 700)),  # empty
]
BOXES_1D = [((0, 40000),), ((16383, 16385),), ((100, 33000),), ((39999, 40000),), ((7, 7),)]


def _slice(box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


@pytest.mark.parametrize("box", BOXES_2D)
def test_matrix_box_equals_slice_of_full_draw(box) -> None:
    full = full_standard_normal(WQ, (300, 700), seed=SEED)
    part, _ = standard_normal_box(WQ, (300, 700), box, seed=SEED)
    assert torch.equal(part, full[_slice(box)])


@pytest.mark.parametrize("box", BOXES_1D)
def test_vector_box_equals_slice_of_full_draw(box) -> None:
    full = full_standard_normal("some.bias", (40000,), seed=SEED)
    part, _ = standard_normal_box("some.bias", (40000,), box, seed=SEED)
    assert torch.equal(part, full[_slice(box)])


def test_random_boxes_of_a_three_dim_tensor() -> None:
    shape = (3, 130, 600)
    full = full_standard_normal("experts.w1", shape, seed=SEED)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        box = []
        for n in shape:
            a, b = sorted(torch.randint(0, n + 1, (2,), generator=gen).tolist())
            box.append((a, b))
        assert torch.equal(standard_normal_box("experts.w1", shape, box, seed=SEED)[0], full[_slice(box)])


def test_draw_depends_on_name_seed_and_nothing_else() -> None:
    a = full_standard_normal(WQ, (64, 256), seed=SEED)
    assert torch.equal(a, full_standard_normal(WQ, (64, 256), seed=SEED))
    assert not torch.equal(a, full_standard_normal(WQ, (64, 256), seed=SEED + 1))
    assert not torch.equal(a, full_standard_normal("layers.1.attention.wq.weight", (64, 256), seed=SEED))
    assert 0.95 < float(full_standard_normal(WQ, (512, 512), seed=SEED).std()) < 1.05


def test_init_scales_outputs_and_sets_norms_to_one() -> None:
    n_layers, std = INIT["n_layers"], INIT["std"]
    wo = "layers.2.attention.wo.weight"
    scaled = full_init_value(wo, (64, 64), **INIT)
    assert torch.equal(scaled, full_standard_normal(wo, (64, 64), seed=SEED) * (std / (2 * n_layers) ** 0.5))
    assert torch.equal(full_init_value(WQ, (64, 64), **INIT), full_standard_normal(WQ, (64, 64), seed=SEED) * std)
    norm, drawn = init_box("layers.0.ffn_norm.weight", (64,), [(16, 48)], **INIT)
    assert torch.equal(norm, torch.ones(32)) and drawn == 0


def test_drawn_elements_follow_the_slice() -> None:
    """An 8b-sized q projection (4096 x 4096): a tp=8 or tp=8 x fsdp=8 shard draws 1/8 or 1/64 of it."""
    shape = (4096, 4096)
    numel = shape[0] * shape[1]
    colwise = shard_indices(shape, (8,), (3,), [Shard(0)])
    rowwise = shard_indices(shape, (8,), (5,), [Shard(1)])
    fsdp_tp = shard_indices(shape, (8, 8), (2, 3), [_StridedShard(0, split_factor=8), Shard(0)])
    for indices, fraction in ((colwise, 8), (rowwise, 8), (fsdp_tp, 64)):
        value, drawn = local_init_value(WQ, shape, indices, **INIT)
        assert value.numel() == drawn == numel // fraction
    assert init_box(WQ, (512, 4096), [(0, 512), (0, 4096)], **INIT)[1] == 512 * 4096


def test_unaligned_shard_draws_at_most_one_tile_more_per_edge() -> None:
    """A vocab-parallel embedding (128256 rows at tp=8: 16032 rows per rank, not a multiple of 64)."""
    shape = (128256, 64)
    for rank in range(8):
        value, drawn = local_init_value("tok_embeddings.weight", shape, shard_indices(shape, (8,), (rank,), [Shard(0)]),
                                        **INIT)
        assert value.numel() <= drawn <= value.numel() + 2 * TILE_MATRIX[0] * shape[1]
    vector, drawn = init_box("some.bias", (10 * TILE_VECTOR,), [(TILE_VECTOR, 2 * TILE_VECTOR)], **INIT)
    assert drawn == vector.numel() == TILE_VECTOR


# (mesh shape, placements): every layout the engine builds, named by what builds it
LAYOUTS = {
    "tp_colwise": ((4,), [Shard(0)]),
    "tp_rowwise": ((4,), [Shard(1)]),
    "replicated": ((4,), [Replicate()]),
    "fsdp": ((4,), [Shard(0)]),
    "hsdp": ((2, 2), [Replicate(), Shard(0)]),
    "fsdp_over_colwise": ((2, 4), [_StridedShard(0, split_factor=4), Shard(0)]),
    "fsdp_over_rowwise": ((2, 4), [Shard(0), Shard(1)]),
    "fsdp_over_replicated_kv": ((2, 4), [Shard(0), Replicate()]),
    "hsdp_over_colwise": ((2, 2, 2), [Replicate(), _StridedShard(0, split_factor=2), Shard(0)]),
    # not built by the engine: DTensor's strided example, whose shards are not contiguous
    "strided_inner": ((2, 2), [Shard(0), _StridedShard(0, split_factor=2)]),
}
SHAPES = [(16, 12), (10, 6), (7, 3), (130, 300)]


def _coordinates(mesh_shape) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(n) for n in mesh_shape)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_shard_indices_agree_with_dtensor(layout: str, shape) -> None:
    """Same local shape and first offset as DTensor computes, and together the shards cover each element."""
    mesh_shape, placements = LAYOUTS[layout]
    copies = torch.zeros(shape, dtype=torch.int64)
    for coord in _coordinates(mesh_shape):
        indices = shard_indices(shape, mesh_shape, coord, placements)
        want_shape, want_offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        assert tuple(len(i) for i in indices) == tuple(want_shape)
        if all(len(i) for i in indices):
            assert tuple(int(i[0]) for i in indices) == tuple(want_offset)
        copies[torch.meshgrid(*indices, indexing="ij")] += 1
    replicas = 1
    for n, p in zip(mesh_shape, placements):
        replicas *= n if isinstance(p, Replicate) else 1
    assert bool((copies == replicas).all()), f"{layout}: every element must be held by exactly {replicas} rank(s)"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_local_value_equals_full_value_at_its_indices(layout: str) -> None:
    shape = (130, 300)
    mesh_shape, placements = LAYOUTS[layout]
    full = full_init_value(WQ, shape, **INIT)
    for coord in _coordinates(mesh_shape):
        indices = shard_indices(shape, mesh_shape, coord, placements)
        local, _ = local_init_value(WQ, shape, indices, **INIT)
        assert torch.equal(local, full[torch.meshgrid(*indices, indexing="ij")])


def test_strided_shard_is_drawn_in_runs() -> None:
    indices = shard_indices((8, 4), (2, 2), (0, 0), LAYOUTS["strided_inner"][1])
    assert indices[0].tolist() == [0, 2]
    assert runs(indices[0]) == [(0, 0, 1), (1, 2, 1)]
    assert runs(torch.tensor([4, 5, 6, 9, 10])) == [(0, 4, 3), (3, 9, 2)]
    assert runs(torch.tensor([], dtype=torch.int64)) == []
