"""greentrainer: FLOPs-bounded fine-tuning of language models (GreenTrainer, SMT)."""
__version__ = "0.1.0"
