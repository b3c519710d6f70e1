"""The ``triarch`` command: each subcommand parses, loads the config and calls one library function.

Bad input (config, flags, data) ends with one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path

from triarch.config import ConfigError, TriarchConfig, load_config, validate_for_world

EXIT_USAGE = 2
EXIT_BAD_DATA = 1  # triarch data verify found a bad shard


class CliError(Exception):
    """A user-facing problem reported as one line."""


MAX_PLANNED_GPUS = 10_000_000  # (the largest clusters hold about 10^5)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="triarch", description="Hybrid TP/PP/DP training of Llama-family models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train (or resume) a run")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*",
                       help="dotted overrides, e.g. train.steps=50 parallel.tp=2 (a key given twice: the last wins)")
    train.add_argument("--nproc", type=_positive_int, default=1, help="local ranks to start (default 1)")
    train.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/<config name>)")

    for kind, text in (("sft", "supervised fine-tuning"), ("rm", "train a reward model"),
                       ("dpo", "direct preference optimization"), ("ppo", "proximal policy optimization"),
                       ("grpo", "group relative policy optimization"), ("rloo", "REINFORCE leave-one-out")):
        stage = sub.add_parser(kind, help=f"{text}: 'train' with objective.kind={kind} (docs/alignment.md)")
        stage.add_argument("config", help="YAML config file")
        stage.add_argument("overrides", nargs="*", help="dotted overrides, e.g. init.from=runs/tiny objective.beta=0.1")
        stage.add_argument("--nproc", type=_positive_int, default=1, help="local ranks to start (default 1)")
        stage.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/<config name>)")

    prof = sub.add_parser("profile", help="profile a few steps: per-rank traces and where each step's time goes "
                          "(docs/profiling.md)")
    prof.add_argument("config", help="YAML config file")
    prof.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.pp=2 train.micro_batch_size=1")
    prof.add_argument("--nproc", type=_positive_int, default=1, help="local ranks to start (default 1)")
    prof.add_argument("--run-dir", type=Path, default=None,
                      help="run directory (default runs/<config name>-profile; an existing run resumes, is "
                           "profiled, and stops)")
    prof.add_argument("--steps", type=_positive_int, default=3, help="profiled steps (default 3)")
    prof.add_argument("--warmup", type=_non_negative_int, default=2, help="plain steps before them (default 2)")

    plan = sub.add_parser("plan", help="rank the layouts that fit N GPUs by predicted memory and step time "
                          "(docs/profiling.md)")
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.global_batch_size=512")
    plan.add_argument("--gpus", type=_positive_int, required=True, help="GPUs in the job")
    plan.add_argument("--gpus-per-node", type=_positive_int, default=8, help="GPUs per node (default 8)")
    plan.add_argument("--gpu", default="h100", help="device model (h100, h200, a100, b200; default h100)")
    plan.add_argument("--top", type=_positive_int, default=10, help="layouts to show (default 10)")
    plan.add_argument("--precision", action="append", choices=["fp32", "bf16", "fp8"], default=None,
                      help="precisions to consider (repeat; default the config's train.precision)")
    plan.add_argument("--fsdp-offload", action="append", choices=["none", "cpu"], default=None,
                      help="parallel.fsdp_offload values to consider (repeatable; default the config's)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ckpt = sub.add_parser("ckpt", help="list, verify, inspect, export or import checkpoints")
    ck = ckpt.add_subparsers(dest="ckpt_command", required=True, parser_class=_Parser)
    for name, text in [("list", "steps, committed or not, size, layout"), ("verify", "check every file's hash"),
                       ("inspect", "tensor names, shapes, dtypes")]:
        p = ck.add_parser(name, help=text)
        p.add_argument("run_dir", type=Path)
        if name != "list":
            p.add_argument("--step", type=int, default=None)
    exp = ck.add_parser("export", help="write a Hugging Face Llama folder (safetensors + config + tokenizer)")
    exp.add_argument("run_dir", type=Path)
    exp.add_argument("--hf", type=Path, required=True, help="output folder")
    exp.add_argument("--step", type=int, default=None)
    exp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    exp.add_argument("--pad-id", type=int, default=None,
                     help="a reward model's padding token id (config pad_token_id; default: the data's pad_id)")
    exp.add_argument("--force", action="store_true",
                     help="export into a non-empty folder, replacing its *.safetensors, index, config.json, "
                          "generation_config.json and tokenizer files (other files stay)")
    imp = ck.add_parser("import", help="start a new run directory from a Hugging Face Llama (or Mistral) folder "
                                       "or a DeepSpeed ZeRO checkpoint of one")
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", type=Path,
                        help="folder with config.json and model.safetensors or model.safetensors.index.json + shards")
    source.add_argument("--deepspeed", type=Path,
                        help="a DeepSpeed checkpoint folder (Hugging Face Trainer's checkpoint-N: config.json, "
                             "'latest' and global_stepN/ with every rank's ZeRO states); weights only")
    imp.add_argument("--run-dir", type=Path, required=True, help="a new or empty run directory")

    data = sub.add_parser("data", help="check prepared data")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    verify = data_sub.add_parser("verify", help="check every shard's size, sha256 and token ids against the "
                                                "manifest; exit 0 if all are good, 1 if any is bad")
    verify.add_argument("folder", help="a prepared folder or fsspec URL (s3://bucket/prefix)")

    _add_slurm_commands(sub)

    prep = sub.add_parser("prepare", help="tokenize text into Arrow shards plus a manifest")
    prep.add_argument("inputs", nargs="*",
                      help="files, folders, globs or fsspec URLs: .txt, .jsonl[.gz|.zst], .parquet, .arrow, "
                           "datasets save_to_disk folders (default: the stdlib docstrings)")
    prep.add_argument("--out", type=Path, required=True,
                      help="output folder (created if missing; not an input folder, nor holding an input)")
    prep.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer.json (default: train a BPE)")
    prep.add_argument("--vocab-size", type=_positive_int, default=4096, help="BPE size when training one")
    prep.add_argument("--validation-fraction", type=float, default=0.05)
    prep.add_argument("--text-field", default="text", help="JSONL field / Parquet or Arrow column holding the text")
    prep.add_argument("--workers", type=_positive_int, default=None,
                      help="tokenizer threads (default min(cores, 8))")
    prep.add_argument("--shard-tokens", type=_positive_int, default=None,
                      help="tokens per shard (default 1Mi); a longer document spans shards")
    prep.add_argument("--batch-tokens", type=_positive_int, default=None,
                      help="tokens per Arrow record batch inside a shard (default 64Ki)")
    prep.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="show progress (default: a bar on a terminal, a log line every 10 s otherwise)")

    sft = sub.add_parser("prepare-sft", help="tokenize SFT JSONL (prompt/response or chat messages) into shards "
                                             "of tokens + loss mask")
    sft.add_argument("inputs", nargs="+", help=".jsonl / .jsonl.gz files, folders or globs")
    sft.add_argument("--tokenizer", type=Path, required=True,
                     help="a tokenizer.json or a folder holding one (and maybe tokenizer_config.json)")
    sft.add_argument("--out", type=Path, required=True, help="output folder: new, empty, or an earlier SFT output")
    sft.add_argument("--template", choices=["auto", "builtin", "tokenizer"], default="auto",
                     help="chat template: the tokenizer's chat_template, the built-in one, or auto (the "
                          "tokenizer's when it has one)")
    sft.add_argument("--max-len", type=_positive_int, default=2048, help="tokens per example at most")
    sft.add_argument("--too-long", choices=["truncate", "drop"], default="truncate")
    sft.add_argument("--eval-fraction", type=float, default=0.0,
                     help="held-out fraction in [0, 1): > 0 writes OUT/train and OUT/validation")
    sft.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    _add_prepare_preferences(sub)
    _add_generate(sub)
    _add_align_report(sub)
    return parser


def _float_arg(low: float | None, high: float | None, *, low_open: bool = False):
    """An argparse type: a float in [low, high] (``low_open``: low excluded; None: unbounded)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value) or (low is not None and (value < low or (low_open and value == low))) or \
                (high is not None and value > high):
            lo = "(" if low_open else "["
            span = f"{lo}{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text} must be {'in ' if high is not None else 'finite and '}{span}")
        return value

    return parse


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="continue prompts with a run's (or a Hugging Face folder's) model",
                         description="Continue prompts on the training engine (any TP/PP/DP layout). Weights: "
                                     "RUN_DIR's newest committed step (or --step), or --hf PATH.")
    gen.add_argument("overrides", nargs="*", metavar="RUN_DIR|KEY=VALUE",
                     help="a run directory, and dotted overrides (e.g. parallel.tp=2 train.precision=bf16)")
    gen.add_argument("--hf", type=Path, default=None, metavar="PATH",
                     help="a Hugging Face Llama folder instead of a run")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                         help="a prompt (repeat for several)")
    prompts.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                         help='a JSONL file, one {"prompt": "..."} per line')
    gen.add_argument("--step", type=_non_negative_int, default=None, metavar="N", help="the run's committed step N")
    gen.add_argument("--tokenizer", type=Path, default=None, metavar="FILE",
                     help="a tokenizer.json or a folder holding one (default: the run's data folder's, or the "
                          "HF folder's)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt in the built-in SFT chat template (a user turn, then the assistant "
                          "header)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
    gen.add_argument("--temperature", type=_float_arg(0.0, None), default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-k", type=_non_negative_int, default=0, help="0: no limit (default)")
    gen.add_argument("--top-p", type=_float_arg(0.0, 1.0, low_open=True), default=1.0,
                     help="nucleus sampling mass in (0, 1] (default 1.0: no limit)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed; tokens depend on (seed, prompt, position)")
    gen.add_argument("--batch-size", type=_positive_int, default=32,
                     help="prompts per data-parallel rank in one generation batch (default 32)")
    gen.add_argument("--out", type=Path, default=None,
                     help="write JSONL records {prompt, completion, completion_ids, finish} here instead of "
                          "printing")
    gen.add_argument("--nproc", type=_positive_int, default=1, help="local ranks to start (default 1)")


def _add_align_report(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("align-report", help="aligned models vs their base on held-out prompts: judge, reward "
                                              "model, length, KL; report.md with figures (docs/alignment.md)")
    rep.add_argument("--base", type=Path, required=True, help="the base model's run directory (or step folder)")
    rep.add_argument("--model", action="append", required=True, metavar="NAME=RUN",
                     help="an aligned model to compare (repeat), e.g. sft=runs/tiny_sft")
    rep.add_argument("--reward", type=Path, required=True, help="the reward model's run directory")
    rep.add_argument("--data", type=Path, required=True, help="a prepare-preferences folder (its prompts)")
    rep.add_argument("--split", default="validation", help="the held-out split (default validation)")
    rep.add_argument("--prompts", type=_positive_int, default=64, help="distinct prompts to evaluate (default 64)")
    rep.add_argument("--max-new-tokens", type=_positive_int, default=48)
    rep.add_argument("--temperature", type=_float_arg(0.0, None), action="append", default=None,
                     help="decoding (repeat for several tables; default 0: greedy)")
    rep.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    rep.add_argument("--examples", type=_non_negative_int, default=6, help="prompts shown side by side (default 6)")
    rep.add_argument("--batch-size", type=_positive_int, default=32, help="prompts per generation batch")
    rep.add_argument("--rl-metrics", action="append", default=[], metavar="NAME=RUN",
                     help="an RL run whose per-iteration curves to plot (RL runs given as --model are plotted "
                          "anyway)")
    rep.add_argument("--out", type=Path, required=True, help="folder for report.md and its figures")


def _add_prepare_preferences(sub: argparse._SubParsersAction) -> None:
    prefs = sub.add_parser("prepare-preferences", help="preference pairs -> OUT/train and OUT/validation folders")
    prefs.add_argument("inputs", nargs="*", help="JSONL files, folders or globs of {prompt, chosen, rejected}")
    prefs.add_argument("--out", type=Path, required=True, help="a new or empty output folder")
    prefs.add_argument("--synthetic", action="store_true",
                       help="build the embedded synthetic set (more helpful, less verbose) instead of reading inputs")
    prefs.add_argument("--seed", type=int, default=None, help="synthetic set: seed (default 0)")
    prefs.add_argument("--pairs", type=int, default=None, help="synthetic set: pairs (default 2000, at least 10)")
    prefs.add_argument("--eval-fraction", type=float, default=0.1, help="held-out fraction (default 0.1)")
    prefs.add_argument("--tokenizer", type=Path, default=None,
                       help="a tokenizer.json (synthetic default: the demo corpus's BPE, trained deterministically)")
    prefs.add_argument("--max-len", type=_positive_int, default=128, help="tokens of prompt + response (default 128)")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def _add_slurm_commands(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser("submit", help="submit a run to SLURM (through submitit) and return")
    submit.add_argument("config", help="YAML config file")
    submit.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    submit.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/<config name>)")
    submit.add_argument("--nodes", type=_positive_int, required=True)
    submit.add_argument("--gpus-per-node", type=_non_negative_int, default=0,
                        help="GPUs per node; one rank per GPU (0: a CPU cluster)")
    submit.add_argument("--tasks-per-node", type=_positive_int, default=None,
                        help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    submit.add_argument("--partition")
    submit.add_argument("--time", default="60", help="time limit in SLURM's format (minutes, HH:MM:SS, D-HH:MM)")
    submit.add_argument("--account")
    submit.add_argument("--qos")
    submit.add_argument("--exclusive", action="store_true")
    submit.add_argument("--constraint")
    submit.add_argument("--mem", help="memory per node, e.g. 64G (GPU jobs default to 0: all of it)")
    submit.add_argument("--cpus-per-task", type=_positive_int, default=None,
                        help="CPUs per rank (GPU jobs default to the node's CPUs / ranks per node)")
    submit.add_argument("--job-name")
    submit.add_argument("--max-retries", type=_non_negative_int, default=0,
                        help="requeues after a failure (crash, dead node, hang); each resumes from the newest checkpoint")
    submit.add_argument("--max-timeouts", type=_non_negative_int, default=3,
                        help="requeues after reaching the time limit (preemptions requeue without limit)")
    submit.add_argument("--signal-delay", type=_positive_int, default=120, dest="signal_delay_s",
                        help="seconds before the time limit at which SLURM sends USR2 (save, then requeue)")
    submit.add_argument("--elastic", action="store_true",
                        help="restart on fewer nodes after a node loss; the data-parallel size shrinks")
    submit.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one run per value (repeat for a grid), submitted as a job array")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    submit.add_argument("--profile", action="store_true",
                        help="profile the job's first steps instead of training on (as 'triarch profile'; "
                             "profile.steps / profile.warmup overrides set how many)")

    status = sub.add_parser("status", help="state of a submitted job (default: recent and active jobs)")
    status.add_argument("job", nargs="?")
    logs = sub.add_parser("logs", help="print a rank's log of a submitted job")
    logs.add_argument("job")
    logs.add_argument("--rank", type=int, default=0)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--stderr", action="store_true", help="the rank's stderr instead of its stdout")
    cancel = sub.add_parser("cancel", help="cancel a submitted job (committed checkpoints stay)")
    cancel.add_argument("job")


# ----------------------------------------------------------------------------------------------


def check_data(cfg: TriarchConfig) -> None:
    """The prepared data must exist and fit the model's vocabulary."""
    if cfg.objective.is_rl:
        from triarch.rlhf.rl_checks import check_rl_setup

        return check_rl_setup(cfg)
    if cfg.objective.uses_pairs:
        return check_preference_data(cfg)
    if cfg.objective.kind == "sft":
        return check_sft_data(cfg)
    evaluating = cfg.train.eval_interval > 0
    checks = [(f"data.blend[{i}].path", b.path, [cfg.data.train_split]) for i, b in enumerate(cfg.data.blend)]
    own = ([cfg.data.eval_split] if evaluating else []) + ([] if cfg.data.blend else [cfg.data.train_split])
    if own:  # with a blend, data.path serves evaluation only
        checks.insert(0, ("data.path", cfg.data.path, own))
    for key, path, splits in checks:
        check_token_folder(cfg, key, path, splits)


def check_token_folder(cfg: TriarchConfig, key: str, path: str, splits: list[str]) -> None:
    """A prepared token folder (local or an fsspec URL) exists, has ``splits`` and fits model.vocab_size."""
    from triarch.data_pipeline import read_manifest
    from triarch.data_pipeline.errors import DataError

    if "://" not in path and not (Path(path) / "manifest.json").is_file():
        raise CliError(f"no prepared data at {path} ({key}); prepare it with: triarch prepare --out {path}")
    try:
        manifest = read_manifest(path)
    except DataError as err:
        raise CliError(f"{key}: {err}") from None
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab > cfg.model.vocab_size:
        raise CliError(f"{key} '{path}' uses a tokenizer of {vocab} tokens, more than "
                       f"model.vocab_size ({cfg.model.vocab_size})")
    for split in splits:
        if split not in manifest["splits"]:
            raise CliError(f"{key} '{path}' has no split '{split}' (has {sorted(manifest['splits'])})")


def check_preference_data(cfg: TriarchConfig) -> None:
    """A reward model or DPO reads a prepared *pairs* folder (and its held-out split when evaluating)."""
    from triarch.data_pipeline.split_folders import split_folder
    from triarch.data_pipeline.stream.preferences import PreferenceDataset

    d = cfg.data
    for split in (d.train_split, d.eval_split if cfg.train.eval_interval else None):
        if split is None:
            continue
        folder = split_folder(d.path, split, train_split=d.train_split)
        dataset = PreferenceDataset(folder, cfg.train.seed)
        if dataset.kind != "pairs":
            raise CliError(f"data.path '{folder}' holds a '{dataset.kind}' set; {cfg.objective.kind} trains on "
                           "pairs (prompt, chosen, rejected)")
        if dataset.vocab_size > cfg.model.vocab_size:
            raise CliError(f"data.path '{folder}' uses a tokenizer of {dataset.vocab_size} tokens, more than "
                           f"model.vocab_size ({cfg.model.vocab_size})")
        if dataset.max_len > cfg.model.seq_len:
            raise CliError(f"data.path '{folder}' was prepared with max_len {dataset.max_len}, more than "
                           f"model.seq_len ({cfg.model.seq_len})")
        if split == d.train_split and len(dataset) < cfg.train.global_batch_size:
            raise CliError(f"data.path '{folder}' holds {len(dataset)} pairs, fewer than one global batch "
                           f"(train.global_batch_size {cfg.train.global_batch_size})")
        if cfg.objective.margin and "margin" not in dataset.columns:
            raise CliError(f"objective.margin needs a per-pair margin, and data.path '{folder}' has none (prepare "
                           "pairs whose JSONL records carry a numeric \"margin\"), or set objective.margin=false")
    if cfg.objective.margin and cfg.objective.kind != "rm":
        raise CliError(f"objective.margin applies to reward models (objective.kind rm), not {cfg.objective.kind}")


def check_sft_data(cfg: TriarchConfig) -> None:
    """SFT reads a prepared SFT folder (``triarch prepare-sft``)."""
    from triarch.data_pipeline.stream.sft import SFTStream

    d = cfg.data
    for split in (d.train_split, d.eval_split if cfg.train.eval_interval else None):
        if split is not None:
            stream = SFTStream(d.path, split, cfg.model.seq_len, global_batch_size=cfg.train.global_batch_size,
                               seed=cfg.train.seed, dp_rank=0, dp_size=1)
            if stream.vocab_size > cfg.model.vocab_size:
                raise CliError(f"data.path '{d.path}' uses a tokenizer of {stream.vocab_size} tokens, more than "
                               f"model.vocab_size ({cfg.model.vocab_size})")
            if stream.truncated_examples:  # by design (whole rows), but the user should know before training
                print(f"warning: {stream.truncated_examples} of {stream.num_examples} examples of split '{split}' "
                      f"in data.path '{d.path}' are longer than model.seq_len ({cfg.model.seq_len}) and are cut "
                      "to their first model.seq_len tokens", file=sys.stderr)
            stream.close()


def check_same_objective(cfg: TriarchConfig, run_dir: Path) -> None:
    """A run directory resumes only the objective it was started with (``triarch dpo`` on a config named like
    a pretraining run would otherwise resume that run)."""
    import yaml

    published = run_dir / "config.yaml"
    if not published.is_file():
        return
    try:
        saved = yaml.safe_load(published.read_text()) or {}
        kind = (saved.get("objective") or {}).get("kind", "pretrain")
    except (OSError, ValueError, yaml.YAMLError, AttributeError):  # (ValueError: not UTF-8)
        return  # the ranks compare the checkpoint's own config
    if kind != cfg.objective.kind:
        raise CliError(f"{run_dir} holds a {kind} run; objective.kind {cfg.objective.kind} cannot resume it: "
                       "use a new --run-dir")


def cmd_stage(args: argparse.Namespace) -> int:
    """``triarch sft|rm|dpo``: train with the objective the command names."""
    cfg = load_config(args.config, args.overrides)
    kind = args.command
    if cfg.objective.kind not in ("pretrain", kind):
        raise CliError(f"config '{args.config}' sets objective.kind={cfg.objective.kind}, but this is "
                       f"'triarch {kind}'; use 'triarch train' or change the config")
    args.overrides = [*args.overrides, f"objective.kind={kind}"]
    return cmd_train(args)


def cmd_profile(args: argparse.Namespace) -> int:
    """``triarch profile``: train with profiling on; the attempt ends after the profiled steps."""
    cfg = load_config(args.config, args.overrides)
    args.overrides = [*args.overrides, "profile.enabled=true", f"profile.steps={args.steps}",
                      f"profile.warmup={args.warmup}"]
    if args.run_dir is None:
        args.run_dir = Path("runs") / f"{cfg.name}-profile"
    fresh = not any((args.run_dir / "checkpoints").glob("step_*/COMMITTED.json"))
    if fresh and args.warmup + args.steps > cfg.train.steps:  # (a resumed run: its ranks check from its step)
        raise CliError(f"--warmup {args.warmup} + --steps {args.steps} go past train.steps={cfg.train.steps}: "
                       "raise train.steps or profile fewer steps")
    return cmd_train(args)


def cmd_plan(args: argparse.Namespace) -> int:
    """``triarch plan``: rank the native engine's layouts on --gpus by predicted tokens/s."""
    from triarch.planning.devices import load_device
    from triarch.planning.render import as_json, print_table
    from triarch.planning.search import plan

    cfg = load_config(args.config, args.overrides)
    if args.gpus > MAX_PLANNED_GPUS or args.gpus_per_node > MAX_PLANNED_GPUS:
        raise CliError(f"--gpus {args.gpus} / --gpus-per-node {args.gpus_per_node}: plan up to "
                       f"{MAX_PLANNED_GPUS:,} GPUs")
    if args.gpus % args.gpus_per_node and args.gpus > args.gpus_per_node:
        raise CliError(f"--gpus {args.gpus} is not a whole number of nodes of --gpus-per-node {args.gpus_per_node}")
    try:
        device = load_device(args.gpu)
    except ValueError as err:
        raise CliError(str(err)) from None
    best = plan(cfg, args.gpus, min(args.gpus_per_node, args.gpus), device, args.top, args.precision,
                args.fsdp_offload)
    if args.json:
        print(as_json(best, device, args.gpus))
    else:
        print_table(best, device, args.gpus, min(args.gpus_per_node, args.gpus))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    cfg = validate_for_world(cfg, args.nproc)
    from triarch.launcher.run_dir import usable_run_dir, write_attempt_config
    from triarch.launcher.run_lock import RunDirBusy, run_dir_lock

    run_dir = args.run_dir or Path("runs") / cfg.name
    check_same_objective(cfg, run_dir)
    if cfg.init.from_ is not None:  # (imports torch: a launch without init.from leaves that to the ranks)
        from triarch.checkpointing.init_from import check_init_source

        check_init_source(cfg, run_dir)  # before the run directory is touched: a refused init.from writes nothing
    check_data(cfg)
    _warn_ignored_keys(cfg)
    run_dir = usable_run_dir(run_dir)

    try:
        with run_dir_lock(run_dir) as lock_fd:
            return _launch(args.nproc, run_dir, write_attempt_config(cfg, run_dir), lock_fd)
    except RunDirBusy as err:
        raise CliError(str(err)) from None


def _warn_ignored_keys(cfg: TriarchConfig) -> None:
    from triarch.engine.build import ignored_engine_keys

    ignored = ignored_engine_keys(cfg)
    if ignored:
        print(f"warning: {', '.join(ignored)} applies to engine: deepspeed and is ignored on engine {cfg.engine}",
              file=sys.stderr)


def _launch(nproc: int, run_dir: Path, config: Path, lock_fd: int) -> int:
    if nproc == 1:
        from triarch.launcher.rank_main import run_rank

        return run_rank(run_dir, config)
    from triarch.launcher.local import LaunchError, launch_local

    try:
        launch_local(nproc, ["-m", "triarch.launcher.rank_entry", str(run_dir), str(config)], keep_fds=[lock_fd])
    except LaunchError as err:
        if err.exit_code == 130:  # Ctrl-C while the ranks were starting (launcher.rank_entry)
            print("interrupted before training started; run the same command to start it", file=sys.stderr)
        elif not err.agreed:  # every rank ending alike has said why itself
            print(f"error: {err}; see the rank logs above", file=sys.stderr)
        return err.exit_code
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from triarch.data_pipeline.prepare import (
        DEFAULT_BATCH_TOKENS,
        DEFAULT_SHARD_TOKENS,
        prepare_files,
        prepare_pydocs,
        read_manifest,
    )

    from triarch.data_pipeline.prepare.tokenizer import MAX_VOCAB_SIZE

    if not 0 < args.validation_fraction < 1:
        raise CliError(f"--validation-fraction ({args.validation_fraction}) must be between 0 and 1")
    if args.vocab_size > MAX_VOCAB_SIZE:
        raise CliError(f"--vocab-size ({args.vocab_size}) must be at most {MAX_VOCAB_SIZE}")
    common = {"validation_fraction": args.validation_fraction, "workers": args.workers, "progress": args.progress,
              "shard_tokens": args.shard_tokens or DEFAULT_SHARD_TOKENS,
              "batch_tokens": args.batch_tokens or DEFAULT_BATCH_TOKENS}
    if not args.inputs:
        if args.tokenizer is not None:
            raise CliError("--tokenizer needs input files; the default corpus trains its own BPE")
        out = prepare_pydocs(args.out, args.vocab_size, **common)
    else:
        if args.tokenizer is not None and not args.tokenizer.is_file():
            raise CliError(f"--tokenizer '{args.tokenizer}' does not exist")
        out = prepare_files(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                            text_field=args.text_field, **common)
    manifest = read_manifest(out)
    totals = manifest["totals"]
    bad = ", ".join(f"{k}={v}" for k, v in sorted(manifest["bad_documents"].items()) if v) or "none"
    print(f"prepared data in {out}: {totals['documents']} documents, {totals['tokens']} tokens; "
          f"bad documents skipped: {totals['bad_documents']} ({bad})")
    return 0


def cmd_prepare_sft(args: argparse.Namespace) -> int:
    """``triarch prepare-sft``: examples written per split, bad records skipped per reason."""
    from triarch.data_pipeline.prepare.sft import prepare_sft

    if not 0 <= args.eval_fraction < 1:
        raise CliError(f"--eval-fraction ({args.eval_fraction}) must be in [0, 1)")
    manifests = prepare_sft(args.inputs, args.tokenizer, args.out, template=args.template, max_len=args.max_len,
                            too_long=args.too_long, eval_fraction=args.eval_fraction, seed=args.seed)
    splits = ", ".join(f"{name} {m['records']} examples ({m['tokens']} tokens, {m['trained_tokens']} trained, "
                       f"{m['truncated']} truncated)" for name, m in manifests.items())
    bad_counts = next(iter(manifests.values()))["bad_records"]
    bad = ", ".join(f"{k}={v}" for k, v in bad_counts.items() if v) or "none"
    print(f"prepared SFT data in {args.out}: {splits}; bad records skipped: {sum(bad_counts.values())} ({bad})")
    return 0


def cmd_prepare_preferences(args: argparse.Namespace) -> int:
    """``triarch prepare-preferences``: the synthetic set, or JSONL inputs split into train / validation."""
    if not 0 < args.eval_fraction < 1:
        raise CliError(f"--eval-fraction ({args.eval_fraction}) must be between 0 and 1")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out '{args.out}' is a file, not a folder; use a new folder")
    if args.out.exists() and any(args.out.iterdir()):
        raise CliError(f"--out '{args.out}' is not empty; use a new folder or delete this one")
    if args.tokenizer is not None and not args.tokenizer.is_file():
        what = "is a folder, not a tokenizer.json file" if args.tokenizer.is_dir() else "does not exist"
        raise CliError(f"--tokenizer '{args.tokenizer}' {what}")
    existed = args.out.exists()
    try:
        return _prepare_preferences(args)
    except BaseException:  # nothing half-written stays behind to refuse the next attempt (--out was empty)
        if args.out.is_dir():
            for entry in args.out.iterdir():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            if not existed:
                args.out.rmdir()
        raise


def _prepare_preferences(args: argparse.Namespace) -> int:
    if args.synthetic:
        from triarch.data_pipeline.prepare.synthetic_preferences import (
            DEFAULT_PAIRS,
            MIN_PAIRS,
            make_synthetic_preferences,
        )

        pairs = DEFAULT_PAIRS if args.pairs is None else args.pairs
        if args.inputs:
            raise CliError("--synthetic takes no input files")
        if pairs < MIN_PAIRS:
            raise CliError(f"--pairs ({pairs}) must be at least {MIN_PAIRS}")
        summary = make_synthetic_preferences(args.out, seed=args.seed or 0, pairs=pairs,
                                             eval_fraction=args.eval_fraction, tokenizer=args.tokenizer,
                                             max_len=args.max_len)
        kinds = ", ".join(f"{k}={sum(v.values())}" for k, v in summary["kinds"].items())
        print(f"synthetic preferences in {args.out}: {summary['splits']['train']} train, "
              f"{summary['splits']['validation']} validation pairs ({kinds}); judge agrees on "
              f"{summary['judge']['agreed']} of {summary['pairs']}")
        return 0
    if not args.inputs or args.tokenizer is None or args.seed is not None or args.pairs is not None:
        raise CliError("without --synthetic, give input files and --tokenizer (--seed and --pairs need --synthetic)")
    from triarch.data_pipeline.prepare.preferences import prepare_preference_splits

    manifests = prepare_preference_splits(args.inputs, args.tokenizer, args.out, args.max_len,
                                          eval_fraction=args.eval_fraction)
    bad = sum(manifests["train"]["bad_records"].values())  # each split reads every record
    print(f"preferences in {args.out}: " + ", ".join(f"{name} {m['records']}" for name, m in manifests.items())
          + f" records; {sum(m['truncated'] for m in manifests.values())} truncated, {bad} bad skipped")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """``triarch data verify``: one line per bad shard, then a summary; exit 1 when any shard is bad."""
    from triarch.data_pipeline.verify import verify_folder

    report = verify_folder(args.folder, report=lambda line: print(line, flush=True))
    print(report.summary())
    return EXIT_BAD_DATA if report.bad else 0


def cmd_submit(args: argparse.Namespace) -> int:
    from triarch.slurm.submit import (
        SubmitOptions,
        log_folder,
        parse_sweep,
        plan_runs,
        render_sbatch,
        submit,
        with_node_cpus,
    )

    options = SubmitOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        partition=args.partition, time=args.time, account=args.account, qos=args.qos, exclusive=args.exclusive,
        constraint=args.constraint, mem=args.mem, cpus_per_task=args.cpus_per_task, job_name=args.job_name,
        max_retries=args.max_retries, max_timeouts=args.max_timeouts, signal_delay_s=args.signal_delay_s,
        elastic=args.elastic, sweep=parse_sweep(args.sweep))
    options = with_node_cpus(options)
    if args.profile:
        args.overrides = [*args.overrides, "profile.enabled=true"]
    if args.dry_run:
        runs = plan_runs(args.config, args.overrides, args.run_dir, options)
        print(render_sbatch(options, runs, log_folder(runs), sys.executable), end="")
        return 0
    from triarch.checkpointing.init_from import check_init_source

    runs = plan_runs(args.config, args.overrides, args.run_dir, options)
    for run in runs:
        check_data(run.cfg)
        check_init_source(run.cfg, run.run_dir)
    _warn_ignored_keys(runs[0].cfg)
    for record in submit(args.config, args.overrides, args.run_dir, options):
        print(f"submitted job {record.job_id}" + (f" [{record.label}]" if record.label else ""))
        print(f"  run directory: {record.run_dir}")
        print(f"  logs: {record.log_path(0)} (rank 0; triarch logs {record.job_id} --rank R)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from triarch.slurm.monitor import status

    return status(args.job)


def cmd_logs(args: argparse.Namespace) -> int:
    from triarch.slurm.monitor import logs

    return logs(args.job, args.rank, args.follow, "err" if args.stderr else "out")


def cmd_cancel(args: argparse.Namespace) -> int:
    from triarch.slurm.monitor import cancel_job

    return cancel_job(args.job)


def cmd_generate(args: argparse.Namespace) -> int:
    from triarch.launcher.generate_job import generate_command

    return generate_command(args)


def cmd_align_report(args: argparse.Namespace) -> int:
    from triarch.rlhf.report import align_report_command

    return align_report_command(args)


def cmd_ckpt(args: argparse.Namespace) -> int:
    from triarch.checkpointing.ops import run

    return run(args)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = args.command in ("train", "profile", "plan", "submit", "sft", "rm", "dpo", "ppo", "grpo", "rloo", "generate")
    unknown = [e for e in extra if e.startswith("-") or not takes_overrides
               or ("=" not in e and args.command != "generate")]  # generate: also its RUN_DIR
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from triarch.checkpointing.errors import CheckpointError
    from triarch.data_pipeline.errors import DataError
    from triarch.slurm.commands import SlurmError

    handlers = {"train": cmd_train, "sft": cmd_stage, "rm": cmd_stage, "dpo": cmd_stage, "ppo": cmd_stage,
                "grpo": cmd_stage, "rloo": cmd_stage, "prepare": cmd_prepare,
                "prepare-sft": cmd_prepare_sft, "data": cmd_data, "ckpt": cmd_ckpt, "submit": cmd_submit,
                "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel,
                "prepare-preferences": cmd_prepare_preferences, "generate": cmd_generate,
                "align-report": cmd_align_report, "profile": cmd_profile, "plan": cmd_plan}
    try:
        code = handlers[args.command](args)
    except (ConfigError, CliError, DataError, CheckpointError, SlurmError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except Exception as err:  # an object store's client refusing (no credentials, no bucket): one line, not a trace
        if not type(err).__module__.startswith(("botocore", "aiobotocore", "s3fs", "gcsfs", "google.")):
            raise
        print(f"error: object store: {type(err).__name__}: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C before the ranks listen for it (loading, checking data)
        print("interrupted before training started; nothing was written to the run", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # the reader went away (``| head``): not an error of ours
        sys.stderr.close()
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
