"""`init.from`: a new run starts from another run's (or a Hugging Face folder's) weights, weights only; and a
reward model exports to / imports from a `LlamaForSequenceClassification` folder (checked with `transformers`)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from triarch.checkpointing import init_from  # noqa: E402
from triarch.checkpointing.init_from import (  # noqa: E402
    InitSourceError,
    load_initial_weights,
    resolve_init_source,
    start_weights,
)
from triarch.checkpointing.manager import CheckpointManager, list_steps  # noqa: E402
from triarch.checkpointing.offline import read_full_tensors  # noqa: E402
from triarch.checkpointing.safe_load import load_plain  # noqa: E402
from triarch.cli import main  # noqa: E402
from triarch.config import load_config, validate_for_world  # noqa: E402
from triarch.data_pipeline import prepare_pydocs  # noqa: E402
from triarch.engine.model_args import llama_args  # noqa: E402
from triarch.engine.native import NativeEngine  # noqa: E402
from triarch.launcher.distributed import init_distributed, shutdown_distributed  # noqa: E402
from triarch.models.hf_llama import from_hf_state_dict  # noqa: E402
from triarch.models.llama import Llama  # noqa: E402
from triarch.training.trainer import build_topology  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VOCAB = 2048  # the prepared data's tokenizer
SHAPE = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
         "model.max_seq_len=128"]
SMALL = [*SHAPE, "model.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=2",
         "train.warmup_steps=1", "train.eval_interval=0", "logging.log_interval=1", "logging.progress=off",
         "logging.tensorboard=false", "checkpoint.interval=1"]
STILL = "train.lr=1e-30"  # an optimizer step that leaves every fp32 weight exactly as it was


def train(run_dir: Path, data: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "triarch.cli", "train", str(EXAMPLES / "tiny.yaml"), "--nproc", str(nproc),
           "--run-dir", str(run_dir), f"data.path={data}", *SMALL, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def train_here(run_dir: Path, data: Path, *overrides: str) -> int:
    """``triarch train`` with one rank, in this process (no interpreter start-up); its exit code."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with pytest.raises(SystemExit) as done:
            main(["train", str(EXAMPLES / "tiny.yaml"), "--run-dir", str(run_dir), f"data.path={data}", *SMALL,
                  *overrides])
    finally:  # the CLI configures logging for its process: leave this one as it was
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return int(done.value.code)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """A pretrained tiny run (two committed steps) and its data."""
    root = tmp_path_factory.mktemp("init_from")
    data = prepare_pydocs(root / "data", VOCAB, max_documents=300)
    run = root / "pretrain"
    assert train_here(run, data) == 0
    return run, data


def newest(run: Path) -> Path:
    return [s for s in list_steps(run / "checkpoints") if s.committed][-1].path


def equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_run_starts_from_another_runs_weights_at_tp2_and_resume_ignores_init_from(source, tmp_path: Path,
                                                                                  capsys) -> None:
    src, data = source
    run = tmp_path / "sft"
    result = train(run, data, f"init.from={src}", STILL, "train.steps=1", "parallel.tp=2", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"init.from: weights of {newest(src)}" in result.stderr
    assert equal_weights(read_full_tensors(run / "checkpoints" / "step_1"), read_full_tensors(newest(src)))
    state = load_plain(run / "checkpoints" / "step_1" / "trainer_state.pt")
    assert state["step"] == 1 and state["data"]["consumed_sequences"] == 4  # the data starts at the beginning
    assert state["init_from"] == str(newest(src)) == resolve_init_source(str(src))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1] and 0 < rows[0]["lr"] <= 1e-30  # a fresh schedule
    # a run directory with a checkpoint resumes: init.from (here a missing path) is ignored, and recorded as before
    assert train_here(run, data, "init.from=/no/such/run", "train.steps=2") == 0
    assert "resumed from" in capsys.readouterr().err
    assert load_plain(run / "checkpoints" / "step_2" / "trainer_state.pt")["init_from"] == str(newest(src))


@pytest.fixture()
def world_of_one():
    init_distributed(torch.device("cpu"))
    yield
    shutdown_distributed()


def engine_for(data: Path, *overrides: str) -> NativeEngine:
    cfg = validate_for_world(load_config(EXAMPLES / "tiny.yaml", [f"data.path={data}", *SMALL, *overrides]), 1)
    return NativeEngine(cfg, build_topology(cfg, torch.device("cpu")))


def test_reward_model_from_a_language_model_exports_to_transformers(source, world_of_one, tmp_path: Path,
                                                                     run_cli) -> None:
    src, data = source
    rm = engine_for(data, "objective.kind=rm")
    line = load_initial_weights(rm, str(src), rm.topo.host_group)
    assert "score.weight keeps its fresh initialization" in line and "output.weight" in line
    loaded, pretrained = rm.full_parameters(), read_full_tensors(newest(src))
    fresh = engine_for(data, "objective.kind=rm").full_parameters()
    assert set(loaded) == set(pretrained) - {"output.weight"} | {"score.weight"}
    assert all(torch.equal(loaded[k], pretrained[k]) for k in loaded if k != "score.weight")
    assert torch.equal(loaded["score.weight"], fresh["score.weight"])
    with torch.no_grad():  # a trained score head (not the init) must survive the round trip
        rm.chunks[0].score.weight.normal_(generator=torch.Generator().manual_seed(1))
    run = tmp_path / "rm"
    CheckpointManager(run, keep=2, host_group=rm.topo.host_group).save(
        0, rm, {"config": rm.cfg.model_dump(mode="json", by_alias=True), "layout": "test"})
    tensors = read_full_tensors(run / "checkpoints" / "step_0")

    # a reward model cannot start a run that needs an LM head: refused on the host, and by the loader itself
    code, err = run_cli("train", EXAMPLES / "tiny.yaml", "--run-dir", tmp_path / "lm", f"data.path={data}", *SMALL,
                        f"init.from={run}")
    assert code == 2 and err.count("\n") == 1 and "is a reward model (score head); objective.kind pretrain" in err
    assert not (tmp_path / "lm").exists()
    with pytest.raises(InitSourceError, match="needs a language-model head"):
        load_initial_weights(engine_for(data), str(run), rm.topo.host_group)

    # export: HF needs a padding id that is not EOS to find each sequence's last token
    out = tmp_path / "hf_rm"
    code, err = run_cli("ckpt", "export", run, "--hf", out, "--dtype", "fp32")
    assert code == 2 and "--pad-id" in err and not out.exists()
    pad = 5
    code, err = run_cli("ckpt", "export", run, "--hf", out, "--dtype", "fp32", "--pad-id", pad)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == pad
    hf = transformers.LlamaForSequenceClassification.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert hf.config.num_labels == 1
    lengths = torch.tensor([7, 20, 13])
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    tokens[tokens == pad] = pad + 1
    eos = int(json.loads((data / "manifest.json").read_text())["tokenizer"]["eos_id"])
    tokens[torch.arange(3), lengths - 1] = eos  # each sequence ends in EOS, then right padding
    real = torch.arange(20)[None] < lengths[:, None]
    tokens[~real] = pad
    theirs = hf(input_ids=tokens, attention_mask=real.long()).logits[:, 0].detach()
    ours_model = Llama(llama_args(rm.cfg))
    ours_model.load_state_dict(tensors)
    ours = ours_model(tokens)[torch.arange(3), lengths - 1, 0].detach()
    assert (ours - theirs).abs().max().item() <= 1e-5

    # import: the folder becomes a reward-model run directory with the same tensors
    back = tmp_path / "rm_back"
    code, err = run_cli("ckpt", "import", "--hf", out, "--run-dir", back)
    assert code == 0, err
    assert load_config(back / "config.yaml").objective.kind == "rm"
    assert equal_weights(read_full_tensors(back / "checkpoints" / "step_0"), tensors)


def save_hf_llama(folder: Path, tied: bool = False) -> transformers.LlamaForCausalLM:
    """A tiny random ``LlamaForCausalLM`` of the tests' shape, saved with ``save_pretrained``."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(folder)
    return hf


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_hf_folder_init_into_sharded_parameters(source, tmp_path: Path) -> None:
    """hf:PATH into two FSDP ranks: each rank copies its shard of the folder's tensors."""
    _, data = source
    folder = tmp_path / "pretrained"
    hf = save_hf_llama(folder)
    run = tmp_path / "from_hf"
    result = train(run, data, f"init.from=hf:{folder}", STILL, "train.steps=1", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = from_hf_state_dict({k: v.detach() for k, v in hf.state_dict().items()}, 2)
    assert equal_weights(read_full_tensors(run / "checkpoints" / "step_1"), expected)
    assert load_plain(run / "checkpoints" / "step_1" / "trainer_state.pt")["init_from"] == f"hf:{folder.resolve()}"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_folder_init_gives_equal_logits(tied: bool, source, world_of_one, tmp_path: Path, caplog,
                                           run_cli) -> None:
    _, data = source
    folder = tmp_path / "pretrained"
    hf = save_hf_llama(folder, tied)
    engine = engine_for(data, f"model.tie_embeddings={str(tied).lower()}")
    line = load_initial_weights(engine, f"hf:{folder}", engine.topo.host_group)
    assert line == f"init.from: weights of hf:{folder.resolve()}"
    expected = from_hf_state_dict({k: v.detach() for k, v in hf.state_dict().items()}, 2)
    if tied:  # one tensor: the engine lists it once, under the embedding's name
        assert torch.equal(expected.pop("output.weight"), expected["tok_embeddings.weight"])
    assert equal_weights(engine.full_parameters(), expected)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    model = engine.chunks[0].eval()
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
    if tied:  # imported, the tied run holds only the embedding; the engine's head loads from it as well
        imported = tmp_path / "imported"
        assert run_cli("ckpt", "import", "--hf", folder, "--run-dir", imported)[0] == 0
        again = engine_for(data, "model.tie_embeddings=true")
        load_initial_weights(again, str(imported), again.topo.host_group)
        assert equal_weights(again.full_parameters(), engine.full_parameters())
    # an RM run from the same folder: the trunk, and a fresh score head
    rm = engine_for(data, "objective.kind=rm")
    assert "score.weight keeps" in load_initial_weights(rm, f"hf:{folder}", rm.topo.host_group)
    # without init.from an alignment objective starts from random weights, and says so
    with caplog.at_level(logging.WARNING, logger="triarch.train"):
        assert start_weights(rm, rm.cfg, rm.topo.host_group) is None
    assert "starting rm from random weights" in caplog.text


@pytest.mark.parametrize("case", ["missing", "hf_missing", "other_dim", "other_layers", "not_committed", "other_heads",
                                  "untied_into_tied"])
def test_unusable_init_from_is_one_line_and_writes_nothing(case: str, source, tmp_path: Path, run_cli) -> None:
    src, data = source
    partial = tmp_path / "partial" / "checkpoints" / "step_3"
    partial.mkdir(parents=True)
    (partial / ".metadata").write_bytes(b"")
    overrides, expected = {
        "missing": (["init.from=/no/such/run"], "/no/such/run does not exist"),
        "hf_missing": ([f"init.from=hf:{tmp_path}/nothing"], "nothing does not exist"),
        "other_dim": (["init.from=" + str(src), "model.dim=32"],
                      "tensor tok_embeddings.weight is (2048, 64) in"),
        "other_layers": (["init.from=" + str(src), "model.n_layers=3"], "has no tensor layers.2."),
        "not_committed": ([f"init.from={partial}"], "is not committed"),
        "other_heads": ([f"init.from={src}", "model.n_heads=8", "model.n_kv_heads=4"],
                        "the same shapes split into other attention heads; set model.n_heads=4 (this run has 8), "
                        "model.n_kv_heads=2 (this run has 4)"),
        "untied_into_tied": ([f"init.from={src}", "model.tie_embeddings=true"],
                             "has its own output.weight, this run ties it to the embedding; set "
                             "model.tie_embeddings=false (this run has true)"),
    }[case]
    run = tmp_path / "refused"
    code, err = run_cli("train", EXAMPLES / "tiny.yaml", "--run-dir", run, f"data.path={data}", *SMALL, *overrides)
    assert code == 2 and err.startswith("error: init.from ") and err.count("\n") == 1, err
    assert expected in err
    if case == "other_dim":
        assert "(2048, 32) in this run's model; set model.dim=64 (this run has 32)" in err
    if case == "other_layers":
        assert "model.n_layers=2 (this run has 3)" in err
    assert not run.exists()  # not even the run directory


def test_refused_on_the_ranks_too(source, tmp_path: Path, monkeypatch, run_cli) -> None:
    """The ranks check again (a checkpoint may change after the host looked): one error line, exit 2."""
    src, data = source
    monkeypatch.setattr(init_from, "check_init_source", lambda *args: None)
    run = tmp_path / "refused"
    code, err = run_cli("train", EXAMPLES / "tiny.yaml", "--run-dir", run, f"data.path={data}", *SMALL,
                        "model.dim=32", f"init.from={src}")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "tensor tok_embeddings.weight is (2048, 64)" in errors[0], err
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()


def test_hf_reward_model_folder_starts_a_reward_model_run(source, world_of_one, tmp_path: Path, run_cli) -> None:
    """A ``save_pretrained`` one-label LlamaForSequenceClassification: hf:PATH into an RM run loads its score
    head too (equal scores), and into an LM objective it is refused."""
    _, data = source
    pad = 3
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, num_labels=1, pad_token_id=pad)
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(config).eval()
    folder = tmp_path / "hf_rm"
    hf.save_pretrained(folder)
    rm = engine_for(data, "objective.kind=rm")
    assert "keeps" not in load_initial_weights(rm, f"hf:{folder}", rm.topo.host_group)
    tokens = torch.randint(pad + 1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    tokens[0, 9:] = pad
    with torch.no_grad():
        ours = rm.chunks[0].eval()(tokens)[torch.tensor([0, 1]), torch.tensor([8, 15]), 0]
        assert (ours - hf(tokens).logits[:, 0]).abs().max().item() <= 1e-5
    code, err = run_cli("train", EXAMPLES / "tiny.yaml", "--run-dir", tmp_path / "sft", f"data.path={data}", *SMALL,
                        "objective.kind=sft", f"init.from=hf:{folder}")
    assert code == 2 and "is a reward model (score head); objective.kind sft needs a language-model head" in err
