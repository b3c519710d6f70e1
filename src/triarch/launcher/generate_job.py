"""``triarch generate``, the command side: resolve the weights, config and tokenizer, read and tokenize the
prompts, check everything that can be checked before a rank starts, write a job file, run the ranks
(``launcher.generate_main``: in this process for one rank, ``launch_local`` for more), and print or write
the completions.

Weights and config come from a run directory (its newest committed step, or ``--step N``, with the config
saved in that checkpoint) or a Hugging Face Llama folder (``--hf``). The layout starts from the defaults
(data parallel over ``--nproc`` ranks), whatever layout the run trained with; dotted overrides (a layout
such as ``parallel.tp=2``, or ``train.precision=bf16``) apply on top; the batch settings are then fitted to
the world (one sequence per micro-batch), since generation does not use them. The tokenizer is ``--tokenizer``,
else the run's data folder's ``tokenizer.json`` (or the HF folder's). Prompts are encoded the way the
model's training text was: a run's without added special tokens (as ``triarch prepare`` and
``prepare-sft`` encode), a Hugging Face folder's with the tokenizer's own (a BOS where it adds one).
``--chat`` wraps each prompt in the built-in SFT chat template as a user turn followed by the assistant
header, encoded part by part as ``prepare-sft`` encodes them.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triarch.config import ConfigError, TriarchConfig, apply_overrides, config_from_dict, validate_for_world

TOKENIZER_FILE = "tokenizer.json"
JOB_FILE = "job.json"
RESULTS_FILE = "results.json"


class GenerateError(ConfigError):
    """A problem with ``triarch generate``'s input, reported as one line (exit 2)."""


@dataclass(frozen=True)
class Source:
    """What to generate with: the weights (an ``init.from`` spec), the config as a dict, the tokenizer."""

    weights: str
    config: dict[str, Any]
    tokenizer: Path | None
    tokenizer_hint: str  # where a tokenizer was looked for, for the error when none is found
    add_special_tokens: bool


@dataclass(frozen=True)
class Prompt:
    text: str
    where: str  # "--prompt 2" or "FILE line 7", for error messages


# ---------------------------------------------------------------------------------------------- source
def _tokenizer_arg(path: Path) -> Path:
    """``--tokenizer``: a tokenizer.json, or a folder holding one."""
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise GenerateError(f"--tokenizer {path} is a folder without {TOKENIZER_FILE}")
        return path / TOKENIZER_FILE
    if not path.is_file():
        raise GenerateError(f"--tokenizer {path} does not exist")
    return path


def run_source(run_dir: Path, step: int | None) -> Source:
    """A run directory's committed step (the newest, or ``step``) and the config saved with it; its
    tokenizer from the run's data folder (``data.path``, or its train split folder)."""
    from triarch.checkpointing.hf_io import pick_step, saved_config

    if not run_dir.exists():
        raise GenerateError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise GenerateError(f"{run_dir} is a file, not a run directory")
    info = pick_step(run_dir, step)
    cfg = saved_config(info)
    data = Path(cfg.data.path)
    candidates = [data / TOKENIZER_FILE, data / cfg.data.train_split / TOKENIZER_FILE]
    found = next((p for p in candidates if p.is_file()), None)
    hint = f"the run's data folder has none ({' or '.join(str(p) for p in candidates)})"
    return Source(str(info.path), cfg.model_dump(mode="json", by_alias=True), found, hint, add_special_tokens=False)


def hf_source(hf_dir: Path) -> Source:
    """A Hugging Face Llama folder: its shape as a run config, its ``tokenizer.json``."""
    from triarch.checkpointing.hf_import import checked_hf_folder, hf_run_config

    args, _, _ = checked_hf_folder(hf_dir)
    tokenizer = hf_dir / TOKENIZER_FILE
    return Source(f"hf:{hf_dir}", hf_run_config(args, hf_dir.resolve().name),
                  tokenizer if tokenizer.is_file() else None, f"{hf_dir} has no {TOKENIZER_FILE}",
                  add_special_tokens=True)


def generation_config(config: dict[str, Any], overrides: list[str], nproc: int) -> TriarchConfig:
    """The source's config with the default layout (the weights load into any; the run's own may not fit
    ``nproc``) on the native engine, and ``overrides``, batch settings that fit ``nproc`` ranks, no compile and no ``init.from``;
    checked against the world size."""
    data = json.loads(json.dumps(config))
    data["parallel"] = {}
    data["engine"] = "native"  # generation runs on the native engine, whichever engine trained the weights
    data = apply_overrides(data, overrides)
    # one sequence per micro-batch and 2 * nproc of them: a multiple of dp, at least (and a multiple of) pp
    data = apply_overrides(data, ["train.micro_batch_size=1", f"train.global_batch_size={2 * nproc}",
                                  "train.compile=false", "init.from=null"])
    cfg = validate_for_world(config_from_dict(data), nproc)
    if cfg.engine != "native":
        raise GenerateError(f"generation runs on engine native (engine '{cfg.engine}' cannot generate yet); drop "
                            f"the engine override: the weights load into the native engine whichever engine trained "
                            f"them")
    if cfg.objective.kind == "rm":
        raise GenerateError("this model is a reward model (objective.kind rm, a score head): it scores sequences "
                            "and cannot generate")
    return cfg


def check_weights(source: Source, cfg: TriarchConfig) -> None:
    """The weights exist and fit the model (metadata and file sizes only), before any rank starts."""
    from triarch.checkpointing.init_from import InitSourceError, describe_source, fresh_parameters

    try:
        fresh_parameters(describe_source(source.weights, hashes=False), cfg)
    except InitSourceError as err:
        raise GenerateError(str(err).replace("init.from ", "weights ", 1)) from None


# ---------------------------------------------------------------------------------------------- prompts
def read_prompts(texts: list[str] | None, file: Path | None) -> list[Prompt]:
    """``--prompt`` values, or the ``{"prompt": ...}`` lines of a JSONL file (blank lines skipped)."""
    if texts is not None:
        prompts = [Prompt(t, f"--prompt {i + 1}") for i, t in enumerate(texts)]
    else:
        assert file is not None
        prompts = list(_jsonl_prompts(file))
        if not prompts:
            raise GenerateError(f"--prompts {file} holds no prompts")
    for p in prompts:
        if p.text == "":
            raise GenerateError(f"{p.where}: the prompt is empty")
    return prompts


def _jsonl_prompts(file: Path):
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise GenerateError(f"cannot read --prompts {file}: {err.strerror or err}") from None
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{file} line {number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise GenerateError(f"{where} is not UTF-8 text") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise GenerateError(f"{where} is not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            got = "no \"prompt\" field" if not isinstance(record, dict) or "prompt" not in record else \
                f"a \"prompt\" of type {type(record['prompt']).__name__}"
            if not isinstance(record, dict):
                got = f"a JSON {type(record).__name__}"
            raise GenerateError(f"{where}: expected an object with a string \"prompt\" field, got {got}")
        yield Prompt(record["prompt"], where)


def chat_parts(text: str) -> list[str]:
    """A prompt as the built-in SFT template renders a user turn, then the assistant's header."""
    from triarch.data_pipeline.prepare.chat_templates import builtin_parts

    user = [t for t, _, _ in builtin_parts([{"role": "user", "content": text}])]
    header = builtin_parts([{"role": "assistant", "content": ""}])[0][0]
    return [*user, header]


def encode_prompts(tokenizer: Any, prompts: list[Prompt], *, chat: bool, add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each prompt (``chat``: the template's parts encoded one by one, as prepare-sft does)."""
    encoded = []
    for p in prompts:
        if chat:
            ids = [i for part in chat_parts(p.text) for i in tokenizer.encode(part, add_special_tokens=False).ids]
        else:
            ids = tokenizer.encode(p.text, add_special_tokens=add_special_tokens).ids
        if not ids:
            raise GenerateError(f"{p.where}: the prompt encodes to no tokens")
        encoded.append(ids)
    return encoded


def check_lengths(prompts: list[Prompt], ids: list[list[int]], cfg: TriarchConfig, max_new_tokens: int) -> None:
    """Every prompt's tokens lie in the model's vocabulary, and the prompt plus ``max_new_tokens`` fits its
    context (``model.max_seq_len``)."""
    vocab, context = cfg.model.vocab_size, cfg.model.max_seq_len
    for p, row in zip(prompts, ids):
        bad = next((t for t in row if t >= vocab), None)
        if bad is not None:
            raise GenerateError(f"{p.where}: token id {bad} is outside the model's vocabulary (model.vocab_size "
                                f"{vocab}); is this the model's tokenizer?")
        if len(row) + max_new_tokens > context:
            raise GenerateError(f"{p.where} has {len(row)} tokens: with --max-new-tokens {max_new_tokens} it needs "
                                f"{len(row) + max_new_tokens} positions, more than the model's context "
                                f"(model.max_seq_len {context})")


# ---------------------------------------------------------------------------------------------- run
def _check_out(out: Path | None, prompts: Path | None) -> None:
    """``--out`` must be a new or earlier JSONL file outside any run directory, not the prompts it reads."""
    if out is None:
        return
    if out.is_dir():
        raise GenerateError(f"--out {out} is a folder; give a file name")
    if not out.parent.resolve().is_dir():
        raise GenerateError(f"--out {out}: folder {out.parent} does not exist")
    if prompts is not None and out.exists() and out.resolve() == prompts.resolve():
        raise GenerateError(f"--out {out} is the --prompts file; write the completions to another file")
    for folder in (out.parent.resolve(), *out.parent.resolve().parents):
        if (folder / "config.yaml").is_file() and ((folder / "checkpoints").is_dir()
                                                   or (folder / "attempts").is_dir()):
            raise GenerateError(f"--out {out} lies inside run directory {folder}; write it elsewhere (a run "
                                "directory holds only what its runs write)")
    if out.exists() and out.suffix != ".jsonl":
        raise GenerateError(f"--out {out} exists and is not a .jsonl file; completions replace the whole file, "
                            "so give a new name")


def _run(job: dict[str, Any], nproc: int) -> tuple[int, dict[str, Any] | None]:
    """Run the ranks on ``job``; (exit code, rank 0's results)."""
    with tempfile.TemporaryDirectory(prefix="triarch-generate-") as work:
        folder = Path(work)
        job = {**job, "results": str(folder / RESULTS_FILE)}
        path = folder / JOB_FILE
        path.write_text(json.dumps(job))
        if nproc == 1:
            from triarch.launcher.generate_main import INTERRUPTED, run_job

            try:
                code = run_job(path)
            except KeyboardInterrupt:
                print("interrupted; no completions written", file=sys.stderr)
                code = INTERRUPTED
        else:
            from triarch.launcher.local import LaunchError, launch_local

            code = 0
            try:
                launch_local(nproc, ["-m", "triarch.launcher.generate_main", str(path)])
            except LaunchError as err:
                if not err.agreed:  # ranks ending alike have said why themselves
                    print(f"error: {err}; see the rank logs above", file=sys.stderr)
                code = err.exit_code
        results = folder / RESULTS_FILE
        return code, json.loads(results.read_text()) if code == 0 and results.is_file() else None


def _records(prompts: list[Prompt], completions: list[list[int]], tokenizer: Any, eos: int) -> list[dict]:
    records = []
    for prompt, ids in zip(prompts, completions):
        finish = "eos" if ids and ids[-1] == eos else "length"
        text_ids = ids[:-1] if finish == "eos" else ids
        records.append({"prompt": prompt.text, "completion": tokenizer.decode(text_ids, skip_special_tokens=True),
                        "completion_ids": ids, "finish": finish})
    return records


def _write_jsonl(records: list[dict], out: Path) -> None:
    from triarch.data_pipeline.fileio import replace_atomically, temp_path

    tmp = temp_path(out)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        replace_atomically(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise GenerateError(f"cannot write --out {out}: {err.strerror or err}") from None


def _print(records: list[dict]) -> None:
    for i, r in enumerate(records):
        print(f"=== prompt {i} ===")
        print(r["prompt"])
        print(f"--- completion ({r['finish']}, {len(r['completion_ids'])} tokens) ---")
        print(r["completion"])
        print()


def generate_command(args: Any) -> int:
    """``triarch generate``: check everything, run the ranks, print or write the completions."""
    from triarch.data_pipeline.prepare.tokenizer import eos_id, load_tokenizer

    targets = [t for t in args.overrides if "=" not in t or Path(t).exists()]
    overrides = [t for t in args.overrides if t not in targets]
    if len(targets) > 1:
        raise GenerateError(f"one run directory at most, got {len(targets)}: {' '.join(targets)}")
    run_dir = Path(targets[0]) if targets else None
    if (run_dir is None) == (args.hf is None):
        raise GenerateError("give a run directory or --hf PATH (exactly one)")
    if args.hf is not None and args.step is not None:
        raise GenerateError("--step picks a checkpoint of a run directory; --hf has none")
    _check_out(args.out, args.prompts)
    prompts = read_prompts(args.prompt, args.prompts)
    source = run_source(run_dir, args.step) if run_dir is not None else hf_source(args.hf)
    cfg = generation_config(source.config, overrides, args.nproc)
    tokenizer_path = _tokenizer_arg(args.tokenizer) if args.tokenizer is not None else source.tokenizer
    if tokenizer_path is None:
        raise GenerateError(f"no tokenizer: {source.tokenizer_hint}; pass --tokenizer FILE")
    tokenizer = load_tokenizer(tokenizer_path)
    eos = eos_id(tokenizer, tokenizer_path)
    ids = encode_prompts(tokenizer, prompts, chat=args.chat, add_special_tokens=source.add_special_tokens)
    check_lengths(prompts, ids, cfg, args.max_new_tokens)
    check_weights(source, cfg)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "seed": args.seed, "eos_id": eos}
    job = {"config": cfg.model_dump(mode="json", by_alias=True), "weights": source.weights, "prompts": ids,
           "sampling": sampling, "batch_size": args.batch_size}
    start = time.perf_counter()
    code, results = _run(job, args.nproc)
    if code != 0 or results is None:
        return code or 1
    records = _records(prompts, results["completions"], tokenizer, eos)
    new_tokens = sum(len(r["completion_ids"]) for r in records)
    if args.out is not None:
        _write_jsonl(records, args.out)
    else:
        _print(records)
    print(f"generated {new_tokens} tokens for {len(records)} prompts in {results['generate_s']:.2f} s "
          f"({new_tokens / max(results['generate_s'], 1e-9):,.1f} tokens/s; {time.perf_counter() - start:.1f} s "
          f"with start-up){f'; wrote {args.out}' if args.out is not None else ''}", file=sys.stderr)
    return 0

