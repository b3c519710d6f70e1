"""Initial-weight time of one rank: drawing only its shard against drawing each full parameter.

The layers of one pipeline stage of a named model (default: 2 layers of 8b, to stay under a minute) at one
simulated tensor-parallel rank (default tp=8): q/k/v and w1/w3 column-wise, wo/w2 row-wise, norms whole.
Slices come from ``parallel.init.shard_indices`` with that mesh coordinate, so no process group is needed.
- old full draw: the previous scheme, ``torch.randn`` of the full parameter from one generator, then the
  rank keeps its slice (what every rank did before);
- local draw: ``parallel.init.local_init_value``, which draws only the tiles that the shard touches.
Also the cost of the tiles themselves: one full w1 drawn tile by tile against one ``torch.randn``.
One thread, like one of the 8 ranks sharing a node. Last line: JSON with ``full_draw_s``, ``local_draw_s``,
``speedup``, ``elements_full``, ``elements_local``, ``elements_drawn``, ``tiled_vs_randn``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import zlib
from pathlib import Path

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from triarch.config import load_config
from triarch.engine.model_args import llama_args
from triarch.models.llama import Llama
from triarch.parallel.init import full_init_value, local_init_value, shard_indices

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COLWISE = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")
ROWWISE = ("wo.weight", "w2.weight")


def tp_placement(name: str) -> Placement:
    """The tensor-parallel placement of a block parameter (``parallel.tensor_parallel``'s plan)."""
    if name.endswith(COLWISE):
        return Shard(0)
    if name.endswith(ROWWISE):
        return Shard(1)
    return Replicate()


def stage_parameters(model: str, layers: int) -> tuple[dict[str, torch.Size], int]:
    """Full shapes of the first ``layers`` blocks of a named model, and its total layer count."""
    args = llama_args(load_config(EXAMPLES / f"{model}.yaml"))
    with torch.device("meta"):
        llama = Llama(args)
    shapes = {name: p.shape for name, p in llama.named_parameters()
              if name.startswith("layers.") and int(name.split(".")[1]) < layers}
    return shapes, args.n_layers


def old_full_draw(name: str, shape: torch.Size, index: list[torch.Tensor], *, seed: int, std: float,
                  n_layers: int) -> torch.Tensor:
    """The previous init: the full parameter from a generator seeded by (seed, crc32(name)), then the slice."""
    if name.endswith("norm.weight"):
        full = torch.ones(shape)
    else:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        scale = std / math.sqrt(2 * n_layers) if name.endswith(ROWWISE) else std
        full = torch.randn(shape, generator=gen) * scale
    box = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in index)  # TP shards are contiguous
    return full[box].clone()  # the copy into the rank's shard


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="8b", help="a config name under examples/")
    parser.add_argument("--layers", type=int, default=2, help="blocks in the simulated pipeline stage")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--tp-rank", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init = {"seed": 1234, "std": 0.02}
    shapes, n_layers = stage_parameters(args.model, args.layers)
    indices = {name: shard_indices(shape, (args.tp,), (args.tp_rank,), [tp_placement(name)])
               for name, shape in shapes.items()}

    full_s, local_s, drawn = 0.0, 0.0, 0
    for name, shape in shapes.items():
        seconds, _ = timed(lambda: old_full_draw(name, shape, indices[name], n_layers=n_layers, **init))
        full_s += seconds
        seconds, (_, count) = timed(lambda: local_init_value(name, shape, indices[name], n_layers=n_layers, **init))
        local_s += seconds
        drawn += count

    w1 = "layers.0.feed_forward.w1.weight"
    randn_s, _ = timed(lambda: torch.randn(shapes[w1], generator=torch.Generator().manual_seed(0)))
    tiled_s, _ = timed(lambda: full_init_value(w1, shapes[w1], n_layers=n_layers, **init))

    check = "layers.0.attention.wk.weight"
    local, _ = local_init_value(check, shapes[check], indices[check], n_layers=n_layers, **init)
    full = full_init_value(check, shapes[check], n_layers=n_layers, **init)
    assert torch.equal(local, full[torch.meshgrid(*indices[check], indexing="ij")]), "local draw != slice of full"

    elements_full = sum(s.numel() for s in shapes.values())
    elements_local = sum(math.prod(len(i) for i in index) for index in indices.values())
    print(f"{args.model}, {args.layers} layers ({elements_full / 1e6:.0f}M parameters), tp={args.tp} rank "
          f"{args.tp_rank} holds {elements_local / 1e6:.0f}M, draws {drawn / 1e6:.0f}M random values (norms are ones)")
    print(f"old full draw + slice: {full_s:7.2f} s")
    print(f"local tiled draw:      {local_s:7.2f} s   ({full_s / local_s:.1f}x faster)")
    print(f"one full w1 {tuple(shapes[w1])}: torch.randn {randn_s:.2f} s, by tiles {tiled_s:.2f} s "
          f"({tiled_s / randn_s:.2f}x)")
    print(json.dumps({"model": args.model, "layers": args.layers, "tp": args.tp, "elements_full": elements_full,
                      "elements_local": elements_local, "elements_drawn": drawn, "full_draw_s": round(full_s, 3),
                      "local_draw_s": round(local_s, 3), "speedup": round(full_s / local_s, 2),
                      "tiled_vs_randn": round(tiled_s / randn_s, 3)}))


if __name__ == "__main__":
    main()
