"""Losses and objectives, below every engine and the training loop.

An objective turns one micro-batch's model output and its per-row fields into a loss sum and statistics
(``base.Objective``); an engine runs it inside its forward/backward (on the last pipeline stage), so
pretraining, SFT, reward modelling, DPO, PPO and GRPO are each an objective plus a batch layout, on any
engine.
"""
