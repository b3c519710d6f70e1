"""Every config validation rule, checked by its message; and the CLI's one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from triarch.config import ConfigError, load_config, validate_for_world

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["train.stepz=3"], 1, "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
        (["parallell.tp=2"], 1, "unknown config key 'parallell' (did you mean 'parallel'?)"),
        (["parallel.tp=2", "parallel.dp_shard=1"], 4, "parallel.tp*pp*dp_replicate*dp_shard (2*1*1*1 = 2) must equal the world size (4)"),
        (["parallel.tp=3"], 4, "world size (4) is not divisible by parallel.tp*pp*dp_replicate (3*1*1 = 3)"),
        (["model.n_heads=6", "model.dim=192", "model.n_kv_heads=2", "parallel.tp=4"], 4, "model.n_heads (6) must be divisible by parallel.tp (4)"),
        (["model.dim=192", "model.n_heads=12", "model.n_kv_heads=3", "parallel.tp=2"], 2, "model.n_kv_heads (3) and parallel.tp (2) must divide one another"),
        (["model.n_layers=6", "parallel.pp=4", "train.global_batch_size=16"], 4, "model.n_layers (6) must be divisible by parallel.pp*virtual_stages (4*1 = 4)"),
        (["model.n_layers=4", "parallel.pp=2", "parallel.virtual_stages=4", "parallel.schedule=interleaved_1f1b", "train.global_batch_size=16"], 2, "model.n_layers (4) must be divisible by parallel.pp*virtual_stages (2*4 = 8)"),
        (["train.global_batch_size=12", "train.micro_batch_size=4"], 2, "train.global_batch_size (12) must be divisible by train.micro_batch_size*dp (4*2 = 8)"),
        (["parallel.pp=4", "model.n_layers=4", "train.global_batch_size=8", "train.micro_batch_size=4"], 4, "micro-batches per step (2) must be at least the pipeline stages (parallel.pp 4) for 1f1b"),
        (["model.seq_len=8192"], 1, "model.seq_len (8192) exceeds model.max_seq_len (4096)"),
        (["train.steps=0"], 1, "train.steps = 0: Input should be greater than 0"),
        (["model.dim=-64"], 1, "model.dim = -64: Input should be greater than 0"),
        (["train.micro_batch_size=0"], 1, "train.micro_batch_size = 0: Input should be greater than 0"),
        (["train.steps=10", "train.warmup_steps=5", "train.decay_steps=20"], 1, "learning-rate schedule (train.warmup_steps 5 + train.decay_steps 20) is longer than the run (train.steps 10)"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], 1, "train.global_batch_size (10) must be divisible by train.micro_batch_size (4)"),
        (["train.precision=fp16"], 1, "train.precision = 'fp16': Input should be 'fp32', 'bf16' or 'fp8'"),
        (["checkpoint.keep=1"], 1, "checkpoint.keep = 1: Input should be greater than or equal to 2"),
        (["parallel.virtual_stages=2"], 1, "parallel.virtual_stages (2) needs parallel.schedule interleaved_1f1b or zero_bubble, not 1f1b"),
        (["model.tie_embeddings=true", "parallel.pp=2"], 2, "model.tie_embeddings needs the embedding and the head on one stage; it cannot be used with parallel.pp (2)"),
    ],
)
def test_rule_message(overrides: list[str], world: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_for_world(_cfg(*overrides), world)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_valid_layout_resolves_dp_shard() -> None:
    cfg = validate_for_world(_cfg("parallel.tp=2", "train.global_batch_size=16"), 8)
    assert cfg.parallel.dp_shard == 4


def test_override_typing_and_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 7}}))
    cfg = load_config(path, ["train.warmup_steps=2", "train.lr=1e-3", "parallel.sequence_parallel=false"])
    assert (cfg.name, cfg.train.steps, cfg.train.lr, cfg.parallel.sequence_parallel) == ("c", 7, 1e-3, False)
    from triarch.config import parse_override

    assert parse_override("init.from=hf:") == (["init", "from"], "hf:")  # text, not YAML's {"hf": None}
    assert parse_override("data.blend=[{path: a, weight: 2}]")[1] == [{"path": "a", "weight": 2}]


@pytest.mark.parametrize(
    ("text", "message"),
    [("- a\n- b\n", "must hold a mapping at the top level"), ("a: [1,\n", "is not valid YAML"),
     ("train:\n  lr: 1e-3\n  steps: 5\n  lr: 3e-4\n",
      r"not valid YAML: key 'lr' is given twice in one mapping \(line 4\)"),
     ("train: {steps: 5}\ntrain: {lr: 1e-3}\n", "key 'train' is given twice")],
)
def test_bad_yaml_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_dates_and_numbers_stay_text_in_run_names(tmp_path: Path) -> None:
    """``name=2024-01-01`` is a run name (YAML would make it a date), and so is ``name=0042``."""
    path = tmp_path / "c.yaml"
    path.write_text("name: 2025-06-30\n")
    assert load_config(path).name == "2025-06-30"
    assert load_config(None, ["name=2024-01-01"]).name == "2024-01-01"
    assert load_config(None, ["name=0042"]).name == "0042"  # as typed (YAML would read an octal 34)
    path.write_text("name: 2025\n")
    assert load_config(path).name == "2025"


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triarch.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", str(EXAMPLES / "tiny.yaml"), "--nproc", "3", "parallel.tp=2"], "error: world size (3) is not divisible by parallel.tp*pp*dp_replicate (2*1*1 = 2)"),
        (["train", str(EXAMPLES / "tiny.yaml"), "train.lr"], "error: override 'train.lr' must look like section.key=value"),
        (["train", str(EXAMPLES / "tiny.yaml"), "--nproc", "0"], "error: argument --nproc: 0 must be positive"),
        (["train", str(EXAMPLES / "tiny.yaml"), "--bogus"], "error: unrecognized arguments: --bogus"),
        (["train", str(EXAMPLES / "tiny.yaml"), "data.path=/nonexistent/data"], "error: no prepared data at /nonexistent/data"),
        (["train", str(EXAMPLES / "tiny.yaml"), "data.path=file:///nonexistent/data"],
         "error: data.path: no manifest at file:///nonexistent/data/manifest.json"),
        (["train", str(EXAMPLES / "tiny.yaml"), "fault.collective_timeout_s=inf"],
         "error: fault.collective_timeout_s = 'inf': Input should be a finite number"),
        (["train", str(EXAMPLES / "tiny.yaml"), "fault.startup_timeout_s=1e15"],
         "error: fault.startup_timeout_s = '1e15': Input should be less than or equal to 2000000"),
        (["train", str(EXAMPLES / "tiny.yaml"), "train.lr=nan"], "error: train.lr = 'nan': Input should be a finite"),
        (["train", str(EXAMPLES / "tiny.yaml"), "train.seed=-1"], "error: train.seed = -1: Input should be greater"),
        (["ppo", str(EXAMPLES / "tiny_ppo.yaml"), "rl.epochs=99999999999999999999"],
         "error: rl.epochs = 99999999999999999999: Input should be less than or equal to 100"),
        (["train", str(EXAMPLES / "tiny.yaml"), "name=../../escape"], "error: name = '../../escape': String should"),
        (["train", str(EXAMPLES / "tiny.yaml"), "name=.."], "error: name '..' is a folder, not a run name"),
        (["train", str(EXAMPLES / "tiny.yaml"), "data.blend=[{path: /nonexistent/blend}]", "train.eval_interval=0"],
         "error: no prepared data at /nonexistent/blend (data.blend[0].path)"),
    ],
)
def test_cli_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_object_store_without_credentials_is_one_line(tmp_path: Path) -> None:
    """No credentials for s3:// (the client's own exception) is one line, exit 2, in every subcommand."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for args in (["data", "verify", "s3://no-bucket/x"], ["train", str(EXAMPLES / "tiny.yaml"),
                                                         "data.path=s3://no-bucket/x"]):
        result = subprocess.run([sys.executable, "-m", "triarch.cli", *args], capture_output=True, text=True,
                                cwd=tmp_path, timeout=120, env={**env, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                                                 "AWS_CONFIG_FILE": "/nonexistent",
                                                                 "AWS_EC2_METADATA_DISABLED": "true"})
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: object store: NoCredentialsError"), result.stderr


@pytest.mark.parametrize("name, folder", [("config.yaml", True), ("metrics.jsonl", True), (".triarch.lock", True),
                                          ("checkpoints", False), ("tensorboard", False), ("heartbeats", False)])
def test_a_run_directory_entry_of_the_wrong_kind_is_refused_before_the_run(tmp_path: Path, name: str,
                                                                            folder: bool) -> None:
    from triarch.launcher.run_dir import RunDirError, usable_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    (run_dir / name).mkdir() if folder else (run_dir / name).write_text("x")
    with pytest.raises(RunDirError, match=f"{run_dir / name} is not a {'file' if folder else 'folder'}"):
        usable_run_dir(run_dir)

