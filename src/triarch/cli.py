"""The ``triarch`` command: each subcommand parses, loads the config and calls one library function.

Bad input (config, flags, data) ends with one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from triarch.config import ConfigError, TriarchConfig, dump_config, load_config, validate_for_world

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing problem reported as one line."""


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
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 parallel.tp=2")
    train.add_argument("--nproc", type=_positive_int, default=1, help="local ranks to start (default 1)")
    train.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/<config name>)")

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
    imp = ck.add_parser("import", help="start a run directory from a Hugging Face Llama folder")
    imp.add_argument("--hf", type=Path, required=True, help="folder with config.json and *.safetensors")
    imp.add_argument("--run-dir", type=Path, required=True)

    prep = sub.add_parser("prepare", help="tokenize text into Arrow shards plus a manifest")
    prep.add_argument("inputs", nargs="*",
                      help="files, folders, globs or fsspec URLs: .txt, .jsonl[.gz|.zst], .parquet, .arrow, "
                           "datasets save_to_disk folders (default: the stdlib docstrings)")
    prep.add_argument("--out", type=Path, required=True, help="output folder")
    prep.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer.json (default: train a BPE)")
    prep.add_argument("--vocab-size", type=_positive_int, default=4096, help="BPE size when training one")
    prep.add_argument("--validation-fraction", type=float, default=0.05)
    prep.add_argument("--text-field", default="text", help="JSONL field / Parquet or Arrow column holding the text")
    prep.add_argument("--workers", type=_positive_int, default=None,
                      help="tokenizer threads (default min(cores, 8))")
    prep.add_argument("--shard-tokens", type=_positive_int, default=None, help="tokens per shard (default 1Mi)")
    prep.add_argument("--batch-tokens", type=_positive_int, default=None,
                      help="tokens per Arrow record batch inside a shard (default 64Ki)")
    prep.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="show progress (default: a bar on a terminal, a log line every 10 s otherwise)")
    return parser


# ----------------------------------------------------------------------------------------------


def check_data(cfg: TriarchConfig) -> None:
    """The prepared data must exist and fit the model's vocabulary."""
    from triarch.data_pipeline import read_manifest

    path = Path(cfg.data.path)
    if not (path / "manifest.json").is_file():
        raise CliError(f"no prepared data at {path} (data.path); prepare it with: triarch prepare --out {path}")
    manifest = read_manifest(path)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab > cfg.model.vocab_size:
        raise CliError(f"data.path '{cfg.data.path}' uses a tokenizer of {vocab} tokens, more than "
                       f"model.vocab_size ({cfg.model.vocab_size})")
    for split in (cfg.data.train_split, cfg.data.eval_split if cfg.train.eval_interval else None):
        if split is not None and split not in manifest["splits"]:
            raise CliError(f"data.path '{cfg.data.path}' has no split '{split}' (has {sorted(manifest['splits'])})")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    cfg = validate_for_world(cfg, args.nproc)
    check_data(cfg)
    run_dir = args.run_dir or Path("runs") / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    from triarch.launcher.run_lock import RunDirBusy, run_dir_lock

    try:
        with run_dir_lock(run_dir):
            dump_config(cfg, run_dir / "config.yaml")
            return _launch(args.nproc, run_dir)
    except RunDirBusy as err:
        raise CliError(str(err)) from None


def _launch(nproc: int, run_dir: Path) -> int:
    if nproc == 1:
        from triarch.launcher.rank_main import run_rank

        return run_rank(run_dir)
    from triarch.launcher.local import LaunchError, launch_local

    try:
        launch_local(nproc, ["-m", "triarch.launcher.rank_main", str(run_dir)])
    except LaunchError as err:
        print(f"error: {err}; see the rank logs above", file=sys.stderr)
        return 1
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from triarch.data_pipeline.prepare import (
        DEFAULT_BATCH_TOKENS,
        DEFAULT_SHARD_TOKENS,
        prepare_files,
        prepare_pydocs,
        read_manifest,
    )

    if not 0 < args.validation_fraction < 1:
        raise CliError(f"--validation-fraction ({args.validation_fraction}) must be between 0 and 1")
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


def cmd_ckpt(args: argparse.Namespace) -> int:
    from triarch.checkpointing.ops import run

    return run(args)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or args.command != "train"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from triarch.data_pipeline.errors import DataError

    from triarch.checkpointing.commit import CheckpointError

    handlers = {"train": cmd_train, "prepare": cmd_prepare, "ckpt": cmd_ckpt}
    try:
        code = handlers[args.command](args)
    except (ConfigError, CliError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    sys.exit(code)


if __name__ == "__main__":
    main()
