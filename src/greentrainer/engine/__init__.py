"""What the training loop is built from, one concern each (torchtune's ``training/``): the context methods see,
processes and reductions, precision, memory, checkpoints, metric logging, and full fine-tuning's reference
FLOPs. Nothing here knows any method; ``greentrainer.loop`` composes it."""
