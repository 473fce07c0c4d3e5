"""Reinforcement learning from feedback: rollouts, reward sources, experience and the PPO/RLOO/GRPO trainer."""
