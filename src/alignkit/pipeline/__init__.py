"""The whole pipeline: one recipe runs every stage (data → SFT → comparisons → reward model → PPO / DPO →
evaluation → report)."""
