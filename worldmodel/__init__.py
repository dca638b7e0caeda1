"""World models: frame tokenizer and action-conditioned dynamics for imagined rollouts."""
