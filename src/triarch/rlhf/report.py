"""``triarch align-report``: the aligned-vs-base report, "more helpful and less verbose".

Evaluates the base and each aligned model on held-out prompts (``rlhf.evaluate``) under each decoding asked
for (greedy by default), and writes into ``--out``:

- ``report.md``: per decoding, a table (the rule judge's mean score, the reward model's mean score, mean
  response length in tokens and words, the KL to the base, the fraction ending at EOS; base first) with each
  model's difference to the base, then several prompts with every model's response side by side; the RL
  runs' curves and the reward-model score distributions as figures;
- ``rl_curves.png``: reward (the RL run's own ``reward_mean``: reward-model score minus any missing-EOS
  penalty), KL to its reference and response length per iteration, from each RL run's ``metrics.jsonl``;
- ``rm_scores_<decoding>.png``: the reward model's score distribution of the base against each model (and
  the judge's, below it);
- ``completions.jsonl``: every completion (decoding, model, prompt, text, judge, reward-model score, tokens,
  words, KL, ended at EOS) and ``summary.json`` (the tables' figures), for scripts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triarch.rlhf.evaluate import RL_KINDS, EvalPrompts, EvaluationError, ModelResult, ModelSource

REPORT = "report.md"
RL_FIGURE = "rl_curves.png"
COMPLETIONS = "completions.jsonl"
SUMMARY = "summary.json"
RL_PANELS = (("reward_mean", "reward (RM score)"), ("kl", "KL to the reference"),
             ("response_length", "response length (tokens)"))


@dataclass(frozen=True)
class Decoding:
    """One evaluation pass: ``temperature`` 0 is greedy; sampling is keyed by (seed, prompt, token)."""

    temperature: float
    results: list[ModelResult]

    @property
    def label(self) -> str:
        return "greedy" if self.temperature == 0 else f"sampled (temperature {self.temperature:g})"

    @property
    def slug(self) -> str:
        return "greedy" if self.temperature == 0 else f"t{self.temperature:g}"


# ---------------------------------------------------------------------------------------------- RL metrics
def read_rl_metrics(run_dir: Path, label: str) -> list[dict[str, float]]:
    """The per-iteration lines of an RL run's ``metrics.jsonl`` (those with ``reward_mean``), by step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise EvaluationError(f"{label}: {path} does not exist (an RL run directory writes one)")
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(row, dict) and "reward_mean" in row and "step" in row:
            rows[int(row["step"])] = row  # a resumed run may log a step again: the last one counts
    if not rows:
        raise EvaluationError(f"{label}: {path} holds no RL iterations (no reward_mean)")
    return [rows[s] for s in sorted(rows)]


# ---------------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_rl_curves(runs: dict[str, list[dict[str, float]]], path: Path, window: int = 5) -> None:
    """Reward, KL and response length per iteration, one color per run: each iteration's value (thin) and
    the mean of the last ``window`` iterations (thick)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(RL_PANELS), figsize=(4.2 * len(RL_PANELS), 3.4))
    for ax, (key, title) in zip(axes, RL_PANELS):
        for name, rows in runs.items():
            steps = [r["step"] for r in rows if key in r]
            values = [r[key] for r in rows if key in r]
            line, = ax.plot(steps, values, marker=".", linewidth=0.8, alpha=0.5)
            ax.plot(steps, _moving_average(values, window), color=line.get_color(), linewidth=2,
                    label=f"{name} ({window}-iteration mean)")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_rm_scores(results: Sequence[ModelResult], path: Path, label: str) -> None:
    """Score distributions, the base against each other model (one column each): the reward model's (top
    row) and the judge's (bottom row), means in the legends."""
    plt = _pyplot()
    base, others = results[0], list(results[1:]) or [results[0]]
    fig, axes = plt.subplots(2, len(others), figsize=(4.2 * len(others), 6.4), squeeze=False)
    for row, (key, what) in enumerate((("rm", "reward-model score"), ("judge", "judge score"))):
        values = [v for r in results for v in r.values(key)]
        low, high = min(values), max(values)
        bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
        for ax, other in zip(axes[row], others):
            ax.hist(base.values(key), bins=bins, color="0.6", alpha=0.6,
                    label=f"{base.name} ({base.mean(key):.2f})")
            if other is not base:
                ax.hist(other.values(key), bins=bins, histtype="step", linewidth=2,
                        label=f"{other.name} ({other.mean(key):.2f})")
            ax.set_title(f"{other.name} vs {base.name}")
            ax.set_xlabel(what)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel(f"completions ({label})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- markdown
def _cell(text: str, limit: int = 240) -> str:
    """A completion inside a table cell: newlines shown as ⏎, pipes escaped, long ones cut."""
    if len(text) > limit:
        text = text[:limit] + " …"
    text = text.replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")
    if not text.strip():
        return "*(empty)*"
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if len(fence) > 1 else f"`{text}`"


def _signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}"


def table(results: Sequence[ModelResult]) -> list[str]:
    """The markdown table of one decoding (base first)."""
    base = results[0]
    lines = ["| model | kind | judge ↑ | Δ judge | RM score | Δ RM | tokens | words | KL to base | ends at EOS |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r.summary()
        lines.append(f"| {r.name} | {r.kind} | {s['judge']:.3f} | {_signed(s['judge'] - base.mean('judge'))} | "
                     f"{s['rm']:.3f} | {_signed(s['rm'] - base.mean('rm'))} | {s['tokens']:.1f} | {s['words']:.1f} | "
                     f"{s['kl']:.2f} | {100 * s['eos_fraction']:.0f}% |")
    return lines


def verdicts(results: Sequence[ModelResult]) -> list[str]:
    """One line per model: its judge score and length against the base's."""
    base = results[0]
    out = []
    for r in results[1:]:
        dj = r.mean("judge") - base.mean("judge")
        better = f"beats the base on the judge by {dj:.3f}" if dj > 0 else \
            f"scores {-dj:.3f} below the base on the judge" if dj < 0 else "ties the base on the judge"
        ratio = base.mean("tokens") / r.mean("tokens") if r.mean("tokens") > 0 else math.inf
        shorter = f"{ratio:.1f}x shorter" if ratio >= 1 else f"{1 / ratio:.1f}x longer"
        out.append(f"- **{r.name}** {better} ({r.mean('judge'):.3f} vs "
                   f"{base.mean('judge'):.3f}) and is {shorter} ({r.mean('tokens'):.1f} vs {base.mean('tokens'):.1f} "
                   f"tokens, {r.mean('words'):.1f} vs {base.mean('words'):.1f} words).")
    return out


def examples(results: Sequence[ModelResult], prompts: EvalPrompts, count: int) -> list[str]:
    """The first ``count`` prompts, each with every model's response side by side."""
    lines: list[str] = []
    for i in range(min(count, len(prompts.ids))):
        lines += [f"**Prompt {i + 1}:** {_cell(prompts.texts[i])}", "",
                  "| model | response | judge | RM | tokens |", "|---|---|---:|---:|---:|"]
        for r in results:
            s = r.samples[i]
            lines.append(f"| {r.name} | {_cell(s.text)}{'' if s.ended else ' *(no EOS)*'} | {s.judge:.2f} | "
                         f"{s.rm:.2f} | {s.tokens} |")
        lines.append("")
    return lines


def render(decodings: Sequence[Decoding], prompts: EvalPrompts, settings: dict[str, Any], rl_runs: Sequence[str],
           n_examples: int) -> str:
    first = decodings[0].results
    lines = ["# Aligned vs base: more helpful and less verbose", "",
             (f"{len(prompts.ids)} held-out prompts (split `{prompts.split}` of `{settings['data']}`), at most "
             f"{settings['max_new_tokens']} new tokens, stopping at EOS; every model decodes the same prompts the "
             "same way. Judge: `triarch.rlhf.judge` on the decoded text (the independent evaluation; higher is "
             "more helpful and less verbose, at most 1). RM score: the reward model "
             f"`{settings['reward']}` at the completion's last token. Tokens count the EOS; words are "
             "whitespace-separated. KL to base: per prompt, the sum over the completion's tokens of "
             "log p_model − log p_base (nats), averaged over prompts."), "",
             "Models: " + ", ".join(f"{r.name} = `{r.source}`" for r in first) + ".", ""]
    for d in decodings:
        lines += [f"## {d.label[0].upper() + d.label[1:]}", "", *table(d.results), "", *verdicts(d.results),
                  "", f"![reward-model (top) and judge (bottom) scores, {d.label}](rm_scores_{d.slug}.png)", ""]
    if rl_runs:
        lines += ["## RL runs per iteration", "",
                  ("From each run's `metrics.jsonl`: the mean reward of the iteration's rollouts (sampled at the "
                   "run's temperature; the reward model's score minus any missing-EOS penalty), the mean "
                   "per-sequence KL to the run's reference (its starting model) and the mean response length; thin: "
                   f"each iteration, thick: the mean of the last 5. Runs: {', '.join(rl_runs)}."), "",
                  f"![RL curves]({RL_FIGURE})", ""]
    for d in decodings:
        lines += [f"## Examples: {d.label}", "", *examples(d.results, prompts, n_examples)]
    lines += ["Every completion with its scores: `completions.jsonl`; the tables' figures: `summary.json`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- files
def write_report(out: Path, decodings: Sequence[Decoding], prompts: EvalPrompts, settings: dict[str, Any],
                 rl_runs: dict[str, list[dict[str, float]]], n_examples: int = 6) -> Path:
    """Write the report, its figures, ``completions.jsonl`` and ``summary.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for d in decodings:
        plot_rm_scores(d.results, out / f"rm_scores_{d.slug}.png", d.label)
    if rl_runs:
        plot_rl_curves(rl_runs, out / RL_FIGURE)
    with open(out / COMPLETIONS, "w", encoding="utf-8") as f:
        for d in decodings:
            for r in d.results:
                f.writelines(json.dumps({"decoding": d.slug, "temperature": d.temperature, "model": r.name,
                                         "prompt_index": s.prompt, "prompt": prompts.texts[s.prompt],
                                         "completion": s.text, "completion_ids": s.completion_ids, "ended": s.ended,
                                         "tokens": s.tokens, "words": s.words, "judge": s.judge, "rm": s.rm,
                                         "kl": s.kl}, ensure_ascii=False) + "\n" for s in r.samples)
    summary = {"settings": settings, "prompts": len(prompts.ids),
               "decodings": {d.slug: {"temperature": d.temperature, "models": [r.summary() for r in d.results]}
                             for d in decodings},
               "rl_runs": {name: {"iterations": len(rows), "first": rows[0], "last": rows[-1]}
                           for name, rows in rl_runs.items()}}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    path = out / REPORT
    path.write_text(render(decodings, prompts, settings, list(rl_runs), n_examples))
    return path


# ---------------------------------------------------------------------------------------------- command
def _named(text: str, flag: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise EvaluationError(f"{flag} {text}: expected NAME=PATH (e.g. {flag} sft=runs/tiny_sft)")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise EvaluationError(f"{flag} {text}: a name holds letters, digits, '-', '_' and '.' only")
    return name, path


def align_report_command(args: Any) -> int:
    """``triarch align-report``: check the input, evaluate, write the report (exit 0), or one line (exit 2)."""
    import logging
    import time

    from triarch.rlhf.evaluate import check_sources, evaluate, load_prompts, resolve_model

    log = logging.getLogger("triarch.align")
    named = [_named(m, "--model") for m in args.model]
    names = [n for n, _ in named]
    duplicate = next((n for n in names if names.count(n) > 1 or n == "base"), None)
    if duplicate is not None:
        raise EvaluationError(f"--model {duplicate}=...: each model needs its own name, and 'base' is the base's")
    if args.out.exists() and not args.out.is_dir():
        raise EvaluationError(f"--out {args.out} is a file; give a folder")
    temperatures = args.temperature or [0.0]
    base = resolve_model("base", str(args.base), f"--base {args.base}")
    models: list[ModelSource] = [resolve_model(n, p, f"--model {n}={p}") for n, p in named]
    reward = resolve_model("reward", str(args.reward), f"--reward {args.reward}")
    prompts = load_prompts(args.data, args.split, args.prompts)
    check_sources(base, models, reward, prompts, args.max_new_tokens)
    rl_runs = {m.name: read_rl_metrics(m.run_dir, f"--model {m.name}") for m in models
               if m.kind in RL_KINDS and m.run_dir is not None and (m.run_dir / "metrics.jsonl").is_file()}
    for text in args.rl_metrics:
        name, path = _named(text, "--rl-metrics")
        rl_runs[name] = read_rl_metrics(Path(path), f"--rl-metrics {text}")
    start = time.perf_counter()
    log.info("evaluating %d models on %d prompts", 1 + len(models), len(prompts.ids))
    results = evaluate(base, models, reward, prompts, max_new_tokens=args.max_new_tokens, temperatures=temperatures,
                       seed=args.seed, batch_size=args.batch_size)
    decodings = [Decoding(t, r) for t, r in zip(temperatures, results)]
    settings = {"base": str(args.base), "models": dict(named), "reward": str(args.reward), "data": str(args.data),
                "split": args.split, "max_new_tokens": args.max_new_tokens, "temperatures": temperatures,
                "seed": args.seed, "evaluate_s": round(time.perf_counter() - start, 2)}
    path = write_report(args.out, decodings, prompts, settings, rl_runs, args.examples)
    print(f"wrote {path} ({len(prompts.ids)} prompts, {1 + len(models)} models, {len(decodings)} decoding(s), "
          f"{settings['evaluate_s']:.1f} s)")
    for d in decodings:
        for line in verdicts(d.results):
            print(f"{d.label}: {line[2:].replace('**', '')}")
    return 0
