"""`triarch ckpt import --hf` on hostile folders: each fault is one `error:` line naming the file and the field.

Every folder is built from real `transformers` models and configs written with `save_pretrained` (tiny,
local), then damaged the way folders get damaged: a file cut short, a shard deleted, a config of another
family or of another shape beside the weights.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from triarch.checkpointing.offline import read_full_tensors  # noqa: E402
from triarch.models.hf_llama import args_from_hf_config  # noqa: E402
from triarch.models.llama import Llama  # noqa: E402

SHAPE = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128}
SHARD_SIZE = "40KB"  # splits the tiny model into several shards


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triarch.cli", *args], capture_output=True, text=True, timeout=300)


def llama_config(**change) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**SHAPE, "rms_norm_eps": 1e-5, **change})


def save_model(config: transformers.PretrainedConfig, folder: Path, cls=transformers.LlamaForCausalLM, **kw) -> Path:
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # HF initialises norms to 1; randomise them so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, **kw)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    return {"llama": save_model(llama_config(), root / "llama"),
            "sharded": save_model(llama_config(), root / "sharded", max_shard_size=SHARD_SIZE),
            "tied": save_model(llama_config(tie_word_embeddings=True), root / "tied"),
            "bias": save_model(llama_config(attention_bias=True), root / "bias")}


def with_config(src: Path, dst: Path, config: transformers.PretrainedConfig) -> None:
    """``src``'s weights beside a config written by transformers."""
    shutil.copytree(src, dst)
    (dst / "config.json").unlink()
    config.save_pretrained(dst)


def edit_config(dst: Path, edit: Callable[[dict], None]) -> None:
    path = dst / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def missing_config(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    shutil.copytree(m["llama"], dst)
    (dst / "config.json").unlink()
    return str(dst), "config.json"


def config_not_json(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    shutil.copytree(m["llama"], dst)
    text = (dst / "config.json").read_text()
    (dst / "config.json").write_text(text[: len(text) // 2])  # an editor or a copy that stopped half-way
    return str(dst / "config.json"), "not valid JSON"


def gpt2(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    with_config(m["llama"], dst, transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256))
    return str(dst / "config.json"), "model_type 'gpt2'"


def qwen2(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    with_config(m["llama"], dst, transformers.Qwen2Config(**SHAPE))
    return str(dst / "config.json"), "model_type 'qwen2' is not supported: its q/k/v projections have biases"


def mistral_sliding_window(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    with_config(m["llama"], dst, transformers.MistralConfig(**SHAPE, sliding_window=32))
    return str(dst / "config.json"), "sliding_window=32"


def missing_hidden_size(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    shutil.copytree(m["llama"], dst)
    edit_config(dst, lambda c: c.pop("hidden_size"))
    return str(dst / "config.json"), "missing required field 'hidden_size'"


def rope_llama3(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    with_config(m["llama"], dst, llama_config(rope_scaling=scaling))
    return str(dst / "config.json"), "rope_scaling type 'llama3'"


def attention_bias(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    shutil.copytree(m["bias"], dst)
    return str(dst / "config.json"), "attention_bias=True"


def mlp_bias(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    with_config(m["llama"], dst, llama_config(mlp_bias=True))
    return str(dst / "config.json"), "mlp_bias=True"


def tied_config_untied_weights(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    with_config(m["llama"], dst, llama_config(tie_word_embeddings=True))
    return str(dst / "model.safetensors"), "lm_head.weight differs from model.embed_tokens.weight"


def untied_config_tied_weights(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    with_config(m["tied"], dst, llama_config())
    return str(dst / "model.safetensors"), "missing tensor lm_head.weight"


def no_safetensors(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    shutil.copytree(m["llama"], dst)
    (dst / "model.safetensors").unlink()
    return str(dst), "no model.safetensors or model.safetensors.index.json"


def truncated(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    shutil.copytree(m["llama"], dst)
    path = dst / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.6)])  # a copy cut short
    return str(path), "is truncated"


def truncated_inside_header(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    shutil.copytree(m["llama"], dst)
    path = dst / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return str(path), "is truncated"


def missing_shard(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    shutil.copytree(m["sharded"], dst)
    shard = sorted(dst.glob("model-*.safetensors"))[1]
    shard.unlink()
    return str(dst / "model.safetensors.index.json"), f"names shard {shard.name}, which is missing"


def wrong_shape(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    with_config(m["llama"], dst, llama_config(num_key_value_heads=4))  # weights have 2 kv heads
    return str(dst / "model.safetensors"), re.compile(r"tensor model\.layers\.\d\.self_attn\.[kv]_proj\.weight "
                                                      r"has shape \(32, 64\)")


def missing_tensor(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    shutil.copytree(m["llama"], dst)
    path = dst / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    return str(path), "missing tensor model.layers.1.mlp.down_proj.weight"


def extra_layer(m: dict[str, Path], dst: Path) -> tuple[str, str | re.Pattern]:
    with_config(m["llama"], dst, llama_config(num_hidden_layers=1))
    return str(dst / "model.safetensors"), re.compile(r"unexpected tensor model\.layers\.1\.")


CASES = [missing_config, config_not_json, gpt2, qwen2, mistral_sliding_window, missing_hidden_size, rope_llama3,
         attention_bias, mlp_bias, tied_config_untied_weights, untied_config_tied_weights, no_safetensors, truncated,
         truncated_inside_header, missing_shard, wrong_shape, missing_tensor, extra_layer]


@pytest.mark.parametrize("damage", CASES, ids=[c.__name__ for c in CASES])
def test_bad_folder_is_one_line_naming_file_and_field(damage, models, tmp_path: Path, run_cli) -> None:
    folder = tmp_path / "hf"
    file, field = damage(models, folder)
    run = tmp_path / "run"
    code, stderr = run_cli("ckpt", "import", "--hf", folder, "--run-dir", run)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    named = field.search(lines[0]) if isinstance(field, re.Pattern) else field in lines[0]
    assert file in lines[0] and named, lines[0]
    assert not run.exists()  # nothing written, not even an empty run directory


def logits(run: Path, config: dict, tokens: torch.Tensor) -> torch.Tensor:
    model = Llama(args_from_hf_config(config))
    model.load_state_dict(read_full_tensors(run / "checkpoints" / "step_0"))
    return model(tokens).detach()


def test_sharded_folder_imports_like_the_single_file(models, tmp_path: Path) -> None:
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert len(list(models["sharded"].glob("model-*.safetensors"))) > 2
    for src, run in ((models["llama"], single), (models["sharded"], sharded)):
        result = cli("ckpt", "import", "--hf", str(src), "--run-dir", str(run))
        assert result.returncode == 0, result.stderr
    a, b = (read_full_tensors(r / "checkpoints" / "step_0") for r in (single, sharded))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mistral_without_sliding_window_imports_with_equal_logits(tmp_path: Path) -> None:
    config = transformers.MistralConfig(**SHAPE, sliding_window=None, rms_norm_eps=1e-5)
    src = save_model(config, tmp_path / "mistral", cls=transformers.MistralForCausalLM)
    run = tmp_path / "run"
    result = cli("ckpt", "import", "--hf", str(src), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    hf = transformers.MistralForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    ours = logits(run, json.loads((src / "config.json").read_text()), tokens)
    assert (ours - hf(tokens).logits.detach()).abs().max().item() <= 1e-5
