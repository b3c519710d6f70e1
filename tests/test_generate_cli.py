"""``triarch generate``: greedy completions of a Hugging Face folder equal ``transformers`` ``generate``, at
1 rank and at tp2; a run directory (``ckpt import``) at dp2 with an uneven prompt count samples the tokens
that triarch's keyed sampler draws from transformers' logits; ``--chat`` encodes a prompt as prepare-sft
encodes a user turn; bad input ends with one ``error:`` line and exit 2 before any rank starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, models, pre_tokenizers

from triarch.cli import main

EOS, NEW, SEED = 0, 12, 4  # seed 4: the last prompt stops at EOS after 9 tokens, the others run to NEW
WORDS = [f"w{i}" for i in range(62)]
PROMPTS = ["w1 w2 w3", "w10 w11", "w5 w9 w30 w2", "w40 w41 w42 w43 w44 w45"]


def _tokenizer(path: Path) -> Tokenizer:
    vocab = {"<|endoftext|>": EOS, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return tok


def _config(**extra) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS, **extra)


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    """A tiny Llama folder with its tokenizer, and transformers' greedy completions of PROMPTS (to EOS)."""
    path = tmp_path_factory.mktemp("hf_tiny")
    tok = _tokenizer(path / "tokenizer.json")
    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(_config()).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    ids = [tok.encode(p).ids for p in PROMPTS]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), EOS)
    mask = torch.zeros_like(x)
    for i, row in enumerate(ids):
        x[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=EOS,
                         pad_token_id=EOS)[:, width:].tolist()
    return path, [row[:row.index(EOS) + 1] if EOS in row else row for row in out]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triarch.cli", "generate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected(tok: Tokenizer, completions: list[list[int]]) -> list[dict]:
    return [{"prompt": p, "completion": tok.decode(c[:-1] if c[-1] == EOS else c), "completion_ids": c,
             "finish": "eos" if c[-1] == EOS else "length"} for p, c in zip(PROMPTS, completions)]


def test_hf_greedy_equals_transformers(hf, tmp_path) -> None:
    folder, reference = hf
    flags = [x for p in PROMPTS for x in ("--prompt", p)]
    result = _cli("--hf", str(folder), *flags, "--max-new-tokens", str(NEW), "--out", str(tmp_path / "out.jsonl"),
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = _expected(Tokenizer.from_file(str(folder / "tokenizer.json")), reference)
    assert _records(tmp_path / "out.jsonl") == expected
    assert {r["finish"] for r in expected} == {"eos", "length"}  # the fixture stops one prompt at EOS
    assert result.stdout == "" and "generated" in result.stderr


def test_two_ranks_tp2_print_the_same_completions(hf, tmp_path) -> None:
    folder, reference = hf
    flags = [x for p in PROMPTS for x in ("--prompt", p)]
    result = _cli("--hf", str(folder), *flags, "--max-new-tokens", str(NEW), "--nproc", "2", "parallel.tp=2",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for i, record in enumerate(_expected(Tokenizer.from_file(str(folder / "tokenizer.json")), reference)):
        block = (f"=== prompt {i} ===\n{record['prompt']}\n--- completion ({record['finish']}, "
                 f"{len(record['completion_ids'])} tokens) ---\n{record['completion']}\n")
        assert block in result.stdout


def _sampled_reference(folder: Path, prompts: list[str], **params) -> list[list[int]]:
    """transformers' logits, one prompt at a time without a cache, sampled with triarch's keyed sampler
    (each prompt keyed by its index in the list): what any layout must produce."""
    from triarch.engine.sampling import sample_tokens

    model = transformers.LlamaForCausalLM.from_pretrained(folder).float().eval()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    out = []
    for i, prompt in enumerate(prompts):
        ids, new = tok.encode(prompt).ids, []
        with torch.no_grad():
            for t in range(NEW):
                logits = model(torch.tensor([ids + new])).logits[:, -1]
                token, _ = sample_tokens(logits, prompt_index=torch.tensor([i]), token_index=t, **params)
                new.append(int(token))
                if new[-1] == EOS:
                    break
        out.append(new)
    return out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # ckpt import writes in this process
def test_run_dir_at_dp2_samples_as_keyed(hf, tmp_path) -> None:
    """A run made by ``ckpt import`` (its tokenizer found in the run's data folder), at dp2 with 3 prompts (an
    uneven count: the last share is padded) and one prompt per batch: seeded sampling keys on each prompt's
    index, so the tokens equal the keyed sampler's on transformers' logits."""
    from triarch.checkpointing.hf_import import import_hf

    folder, reference = hf
    import_hf(folder, tmp_path / "run")
    (tmp_path / "data" / "pydocs").mkdir(parents=True)  # the imported run's data.path
    shutil.copy(folder / "tokenizer.json", tmp_path / "data" / "pydocs" / "tokenizer.json")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n\n" for p in PROMPTS[:3]))
    result = _cli(str(tmp_path / "run"), "--prompts", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", str(NEW),
                  "--temperature", "0.9", "--top-k", "30", "--top-p", "0.95", "--seed", "7", "--out", "dp2.jsonl",
                  "--nproc", "2", "parallel.dp_shard=2", "--batch-size", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sampled = [r["completion_ids"] for r in _records(tmp_path / "dp2.jsonl")]
    assert sampled == _sampled_reference(folder, PROMPTS[:3], temperature=0.9, top_k=30, top_p=0.95, seed=7)
    assert sampled != reference[:3]  # sampling is not greedy decoding


def test_chat_prompt_is_encoded_as_prepare_sft_encodes_a_user_turn(tmp_path) -> None:
    from triarch.data_pipeline.prepare.sft import prepare_sft
    from triarch.data_pipeline.prepare.tokenizer import train_byte_level_bpe
    from triarch.data_pipeline.stream.sft import SFTStream
    from triarch.launcher.generate_job import Prompt, encode_prompts

    texts = ["<|user|>\nwhat is a list?\n<|assistant|>\nan ordered sequence of items"] * 20
    tok = train_byte_level_bpe(texts, 300, tmp_path / "tokenizer.json")
    record = {"messages": [{"role": "user", "content": "what is a list?"},
                           {"role": "assistant", "content": "an ordered sequence"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(record) + "\n")
    prepare_sft(tmp_path / "chat.jsonl", tmp_path / "tokenizer.json", tmp_path / "sft", template="builtin")
    tokens, mask = SFTStream(tmp_path / "sft", "train", 64, global_batch_size=1).example(0)
    prompt_tokens = tokens[:int(mask.argmax())].tolist()
    ids = encode_prompts(tok, [Prompt("what is a list?", "--prompt 1")], chat=True, add_special_tokens=True)
    assert ids == [prompt_tokens]


def _error(argv: list[str], capsys) -> str:
    """The one stderr line of a refused ``triarch generate`` run in this process (no rank starts)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(hf, tmp_path, capsys) -> None:
    folder, _ = hf
    src = ["--hf", str(folder)]
    jsonl = tmp_path / "p.jsonl"
    cases = {
        "exactly one": ["--prompt", "w1"],
        "one of the arguments --prompt --prompts": src,
        "not allowed with argument --prompt": [*src, "--prompt", "w1", "--prompts", str(jsonl)],
        "--top-p: 0 must be in": [*src, "--prompt", "w1", "--top-p", "0"],
        "--top-p: 1.5 must be in": [*src, "--prompt", "w1", "--top-p", "1.5"],
        "--temperature: -1 must be finite and >= 0": [*src, "--prompt", "w1", "--temperature", "-1"],
        "--temperature: inf must be finite and >= 0": [*src, "--prompt", "w1", "--temperature", "inf"],
        "--top-k: -2 must not be negative": [*src, "--prompt", "w1", "--top-k", "-2"],
        "--max-new-tokens: 0 must be positive": [*src, "--prompt", "w1", "--max-new-tokens", "0"],
        "--prompt 2: the prompt is empty": [*src, "--prompt", "w1", "--prompt", ""],
        "--prompt 1 has 60 tokens": [*src, "--prompt", " ".join(["w3"] * 60), "--max-new-tokens", "8"],
        f"cannot read --prompts {tmp_path / 'missing.jsonl'}": [*src, "--prompts", str(tmp_path / "missing.jsonl")],
        "world size (1) is not divisible": [*src, "--prompt", "w1", "parallel.tp=2"],
        "--out": [*src, "--prompt", "w1", "--out", str(tmp_path / "no" / "such" / "out.jsonl")],
        "--step picks a checkpoint": [*src, "--prompt", "w1", "--step", "3"],
        "unknown config key 'parallel.tq'": [*src, "--prompt", "w1", "parallel.tq=2"],
    }
    for expected, argv in cases.items():
        assert expected in _error(argv, capsys), argv
    for content, expected in [('{"prompt": "w1"}\n{"prompt": "w2"\n', "p.jsonl line 2 is not valid JSON"),
                              ('{"prompt": "w1"}\n\n{"text": "w2"}\n', 'p.jsonl line 3: expected an object'),
                              ('["w1"]\n', "got a JSON list"), ('{"prompt": 3}\n', 'a "prompt" of type int'),
                              ('{"prompt": ""}\n', "line 1: the prompt is empty"), ("\n\n", "holds no prompts")]:
        jsonl.write_text(content)
        assert expected in _error([*src, "--prompts", str(jsonl)], capsys), content
    jsonl.write_bytes(b'{"prompt": "\xff"}\n')
    assert "line 1 is not UTF-8" in _error([*src, "--prompts", str(jsonl)], capsys)
    # --out never replaces what it reads or a run's files (both were overwritten with completions)
    jsonl.write_text('{"prompt": "w1"}\n')
    assert "is the --prompts file" in _error([*src, "--prompts", str(jsonl), "--out", str(jsonl)], capsys)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: run\n")
    assert f"lies inside run directory {run}" in _error([*src, "--prompt", "w1", "--out", str(run / "config.yaml")],
                                                        capsys)
    assert "exists and is not a .jsonl file" in _error([*src, "--prompt", "w1", "--out", str(folder / "config.json")],
                                                       capsys)
    assert jsonl.read_text() == '{"prompt": "w1"}\n' and (run / "config.yaml").read_text() == "name: run\n"


def test_unusable_sources_are_one_line_and_exit_2(hf, tmp_path, capsys) -> None:
    folder, _ = hf
    bare = tmp_path / "bare"  # the model without its tokenizer
    shutil.copytree(folder, bare)
    (bare / "tokenizer.json").unlink()
    assert "has no tokenizer.json; pass --tokenizer" in _error(["--hf", str(bare), "--prompt", "w1"], capsys)
    assert "--tokenizer" in _error(["--hf", str(bare), "--prompt", "w1", "--tokenizer", str(tmp_path / "x.json")],
                                   capsys)
    (tmp_path / "noeos.json").write_text(Tokenizer(models.WordLevel({"[UNK]": 0, "w1": 1}, unk_token="[UNK]"))
                                         .to_str())
    assert "no end-of-text token" in _error(["--hf", str(bare), "--prompt", "w1", "--tokenizer",
                                             str(tmp_path / "noeos.json")], capsys)
    rm = tmp_path / "rm"  # a one-label sequence classifier: a reward model
    transformers.LlamaForSequenceClassification(_config(num_labels=1)).save_pretrained(rm, safe_serialization=True)
    shutil.copy(folder / "tokenizer.json", rm / "tokenizer.json")
    capsys.readouterr()  # save_pretrained's progress bar
    assert "reward model" in _error(["--hf", str(rm), "--prompt", "w1"], capsys)
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    assert "has no committed checkpoint" in _error([str(tmp_path / "empty_run"), "--prompt", "w1"], capsys)
    assert "does not exist" in _error([str(tmp_path / "nowhere"), "--prompt", "w1"], capsys)
    assert "exactly one" in _error([str(tmp_path / "empty_run"), "--hf", str(folder), "--prompt", "w1"], capsys)
    assert "has no tensor layers.2" in _error(["--hf", str(folder), "--prompt", "w1", "--max-new-tokens", "8",
                                              "model.n_layers=4"], capsys)
