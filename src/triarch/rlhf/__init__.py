"""Alignment: SFT, reward model, DPO (later PPO/GRPO) as losses plus batch layouts on the one engine."""
