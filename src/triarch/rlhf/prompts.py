"""The prompts an RL run generates from: the ``prompt`` column of a prepared preference folder (a *prompts*
set, or the prompts of a *pairs* set), in a seeded order that is a pure function of the iteration, so a
resumed run (on any layout) continues with exactly the prompts it would have had."""

from __future__ import annotations

from pathlib import Path

from triarch.data_pipeline.preference_format import TOKENIZER_NAME
from triarch.data_pipeline.split_folders import split_folder
from triarch.data_pipeline.stream.preferences import PreferenceDataset


class PromptSource:
    """Prompts ``[iteration * count, (iteration + 1) * count)`` of the seeded order (across epochs)."""

    def __init__(self, path: str | Path, split: str, seed: int, *, train_split: str = "train") -> None:
        self.folder = split_folder(path, split, train_split=train_split)
        self.dataset = PreferenceDataset(self.folder, seed)
        self.eos_id, self.pad_id, self.vocab_size = self.dataset.eos_id, self.dataset.pad_id, self.dataset.vocab_size

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / TOKENIZER_NAME

    @property
    def max_prompt_len(self) -> int:
        return max(len(self.dataset.record(i)["prompt"]) for i in range(len(self.dataset)))

    def prompts(self, iteration: int, count: int) -> list[tuple[int, list[int]]]:
        """(storage index, prompt token ids) of this iteration's ``count`` prompts."""
        indices = self.dataset.global_indices(iteration * count, count)
        return [(i, self.dataset.record(i)["prompt"].tolist()) for i in indices]
