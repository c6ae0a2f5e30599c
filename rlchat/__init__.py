"""rlchat: RLHF pipelines (SFT, reward model, PPO with LoRA, evaluation) from the command line."""

__version__ = "0.1.0"
