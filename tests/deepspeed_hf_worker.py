"""One rank of a program that is not triarch: a transformers ``LlamaForCausalLM`` trained two steps under
DeepSpeed ZeRO and saved with DeepSpeed's own ``save_checkpoint``, as Hugging Face's Trainer does.

Run through ``triarch.launcher.local.launch_local``; argv: OUT_DIR ZERO_STAGE. Writes OUT_DIR/latest,
OUT_DIR/global_step2/ (every rank's partition), OUT_DIR/config.json and, from rank 0, OUT_DIR/expected.pt: the
trained weights gathered whole, transformers' logits on fixed tokens computed with them, and each parameter's
AdamW moments as DeepSpeed's live engine reports them (``safe_get_full_optimizer_state``).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from triarch.engine.deepspeed import import_deepspeed
from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed

CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 2048, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False}
TOKENS = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))


def main() -> None:
    out, stage = Path(sys.argv[1]), int(sys.argv[2])
    init_distributed(pick_device("cpu"))
    deepspeed = import_deepspeed()
    config = transformers.LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage}, "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    for step in range(2):
        batch = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(1 + 2 * dist.get_rank() + step))
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out))
    from deepspeed.utils import safe_get_full_optimizer_state  # DeepSpeed's public API for one parameter's state

    moments = {f"{name}.{moment}": safe_get_full_optimizer_state(p, moment).detach().clone()
               for name, p in model.named_parameters() for moment in ("exp_avg", "exp_avg_sq")}
    gathered = deepspeed.zero.GatheredParameters(list(model.parameters())) if stage == 3 else contextlib.nullcontext()
    with gathered:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        config.save_pretrained(out)
        fresh = transformers.LlamaForCausalLM(config).eval()
        fresh.load_state_dict(weights)
        with torch.no_grad():
            logits = fresh(TOKENS).logits
        torch.save({"weights": weights, "tokens": TOKENS, "logits": logits, "moments": moments, "steps": 2},
                   out / "expected.pt")
    shutdown_distributed(sync=True)


if __name__ == "__main__":
    main()
    exit_process(0)
