"""`triarch ckpt` list/verify/inspect and Hugging Face export/import against real `transformers` Llama models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from triarch.checkpointing.offline import read_full_tensors
from triarch.data_pipeline import prepare_pydocs
from triarch.models.hf_llama import args_from_hf_config
from triarch.models.llama import Llama

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "model.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=2",
         "train.warmup_steps=1", "train.eval_interval=0", "logging.progress=off", "logging.tensorboard=false",
         "checkpoint.interval=1"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triarch.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hf")
    data = prepare_pydocs(root / "data", 2048, max_documents=500)
    run = root / "run"
    result = cli("train", str(EXAMPLES / "tiny.yaml"), "--run-dir", str(run), f"data.path={data}", *SMALL)
    assert result.returncode == 0, result.stderr[-2000:]
    return run, data


def triarch_logits(tensors: dict[str, torch.Tensor], hf_config: dict, tokens: torch.Tensor) -> torch.Tensor:
    model = Llama(args_from_hf_config(hf_config))
    model.load_state_dict(tensors)
    return model(tokens).detach()


def test_export_loads_in_transformers_with_equal_logits(trained, tmp_path: Path) -> None:
    run, _ = trained
    out = tmp_path / "hf"
    result = cli("ckpt", "export", str(run), "--hf", str(out), "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr  # (DCP's single-process notice is ours to silence)
    assert (out / "tokenizer.json").is_file()
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = triarch_logits(read_full_tensors(run / "checkpoints" / "step_2"), json.loads((out / "config.json").read_text()), tokens)
    theirs = hf(tokens).logits.detach()
    assert (ours - theirs).abs().max().item() <= 1e-5
    # and back: import gives exactly the same tensors
    back = tmp_path / "back"
    result = cli("ckpt", "import", "--hf", str(out), "--run-dir", str(back))
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
    original = read_full_tensors(run / "checkpoints" / "step_2")
    imported = read_full_tensors(back / "checkpoints" / "step_0")
    assert set(original) == set(imported)
    assert all(torch.equal(original[k], imported[k]) for k in original)


def test_save_pretrained_model_imports_and_trains(trained, tmp_path: Path) -> None:
    _, data = trained
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=2048, max_position_embeddings=128, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    src = tmp_path / "pretrained"
    hf.save_pretrained(src)
    run = tmp_path / "run"
    result = cli("ckpt", "import", "--hf", str(src), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    tokens = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(1))
    ours = triarch_logits(read_full_tensors(run / "checkpoints" / "step_0"), config.to_dict(), tokens)
    assert (ours - hf(tokens).logits.detach()).abs().max().item() <= 1e-5
    train = cli("train", str(run / "config.yaml"), "--run-dir", str(run), f"data.path={data}", "model.seq_len=32",
                "train.steps=2", "train.warmup_steps=1", "train.global_batch_size=4", "train.micro_batch_size=2",
                "logging.progress=off", "logging.tensorboard=false", "--nproc", "2", "parallel.tp=2")
    assert train.returncode == 0, train.stderr[-2000:]
    assert "resumed from" in train.stdout + train.stderr
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    # the first step's loss is the imported model's loss on that batch, as transformers computes it
    from triarch.data_pipeline.stream import TokenStream

    seed = yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"]
    batch = torch.from_numpy(TokenStream(data, "train", 32, global_batch_size=4, seed=seed).sequences(0, 4))
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(hf(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
    assert first["step"] == 1 and first["loss"] == pytest.approx(float(hf_loss), rel=1e-5)


def test_list_verify_inspect(trained, tmp_path: Path) -> None:
    run, _ = trained
    listing = cli("ckpt", "list", str(run))
    assert listing.returncode == 0 and "committed" in listing.stdout
    inspect = cli("ckpt", "inspect", str(run))
    assert "model.layers.1.attention.wq.weight" in inspect.stdout and "(64, 64)" in inspect.stdout
    assert cli("ckpt", "verify", str(run)).returncode == 0
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "step_2" / "COMMITTED.json").unlink()
    assert "UNCOMMITTED" in cli("ckpt", "list", str(copy)).stdout
    shard = next((copy / "checkpoints" / "step_1").glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x01
    shard.write_bytes(bytes(raw))
    bad = cli("ckpt", "verify", str(copy), "--step", "1")
    assert bad.returncode == 2 and shard.name in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    shard.unlink()  # a missing shard: `list` says so without hashing (a flipped byte needs `verify`)
    row = next(ln for ln in cli("ckpt", "list", str(copy)).stdout.splitlines() if ln.split()[0] == "1")
    assert row.split()[1] == "DAMAGED" and f"{shard} is missing" in row, row
    missing = cli("ckpt", "export", str(tmp_path / "nothing"), "--hf", str(tmp_path / "o"))
    assert missing.returncode == 2 and "has no committed checkpoint" in missing.stderr


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_import_only_into_a_new_or_empty_run_directory(trained, tmp_path: Path) -> None:
    run, _ = trained
    src = tmp_path / "hf"
    assert cli("ckpt", "export", str(run), "--hf", str(src)).returncode == 0
    # a run with checkpoints: its config.yaml would be replaced and resume would ignore the import
    files_before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}  # config.yaml, lock, metrics
    line = one_error_line(cli("ckpt", "import", "--hf", str(src), "--run-dir", str(run)))
    assert f"run directory {run} is not empty" in line and "checkpoints/" in line and "config.yaml" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files_before
    assert not (run / "checkpoints" / "step_0").exists()
    # strict: a folder holding only an unrelated file is refused too, and gets no lock file
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    line = one_error_line(cli("ckpt", "import", "--hf", str(src), "--run-dir", str(other)))
    assert f"run directory {other} is not empty (holds notes.txt)" in line
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    # a directory a live run holds
    from triarch.launcher.run_lock import run_dir_lock

    busy = tmp_path / "busy"
    busy.mkdir()
    with run_dir_lock(busy):
        line = one_error_line(cli("ckpt", "import", "--hf", str(src), "--run-dir", str(busy)))
    assert f"run directory {busy} is in use by another triarch run (pid " in line
    assert not (busy / "config.yaml").exists()
    # once released it holds only the lock file: empty, so the import goes ahead
    result = cli("ckpt", "import", "--hf", str(src), "--run-dir", str(busy))
    assert result.returncode == 0, result.stderr
    assert (busy / "config.yaml").is_file() and (busy / "checkpoints" / "step_0" / "COMMITTED.json").is_file()


def test_export_refuses_non_empty_folder_and_force_removes_stale_shards(trained, tmp_path: Path) -> None:
    run, _ = trained
    out = tmp_path / "hf"
    bigger = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=2048, max_position_embeddings=128)
    LlamaForCausalLM(bigger).save_pretrained(out, max_shard_size="1MB")  # an earlier, bigger sharded export
    stale = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(stale) > 2 and (out / "model.safetensors.index.json").is_file()
    (out / "tokenizer_config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = one_error_line(cli("ckpt", "export", str(run), "--hf", str(out)))
    assert f"{out} is not empty" in line and "--force" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = cli("ckpt", "export", str(run), "--hf", str(out), "--dtype", "fp32", "--force")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "tokenizer.json"]
    assert not list(tmp_path.glob("hf.tmp-*"))  # the temporary sibling is gone
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = triarch_logits(read_full_tensors(run / "checkpoints" / "step_2"),
                          json.loads((out / "config.json").read_text()), tokens)
    assert (ours - hf(tokens).logits.detach()).abs().max().item() <= 1e-5


def test_export_of_a_damaged_step_or_a_bad_pad_id_is_one_line(trained, tmp_path: Path) -> None:
    run, _ = trained
    line = one_error_line(cli("ckpt", "export", str(run), "--hf", str(tmp_path / "a"), "--pad-id", "-5"))
    assert "--pad-id -5 is outside the vocabulary" in line
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    shard = next((damaged / "checkpoints" / "step_2").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    line = one_error_line(cli("ckpt", "export", str(damaged), "--hf", str(tmp_path / "b")))
    assert str(shard) in line and not (tmp_path / "b").exists()
