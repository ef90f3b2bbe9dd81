"""Supervised training of the models GRPO starts from: the generator (pretrain) and the judge."""
