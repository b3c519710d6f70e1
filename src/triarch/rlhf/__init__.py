"""Alignment: SFT, reward model, DPO, later PPO/GRPO, as losses + batch layouts on the one engine."""
