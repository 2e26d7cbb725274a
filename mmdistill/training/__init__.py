"""The pieces of the distillation trainer; :mod:`mmdistill.trainer` is the recipe that uses them.

* :mod:`~mmdistill.training.schedule`: the learning-rate schedule, AdamW's parameter groups and a
  stage's length in optimiser steps.
* :mod:`~mmdistill.training.processes`: this process's place in the run, barriers and reductions.
* :mod:`~mmdistill.training.deepspeed_engine`: the DeepSpeed configuration and engines.
* :mod:`~mmdistill.training.metrics`: ``metrics.jsonl`` and TensorBoard records.
* :mod:`~mmdistill.training.progress`: the progress bar or log lines on stderr.
* :mod:`~mmdistill.training.state`: the run's and one stage's state.
* :mod:`~mmdistill.training.checkpoints`: checkpoint names, listing, RNG states and writing.
* :mod:`~mmdistill.training.resume`: finding, checking and restoring from a checkpoint.
* :mod:`~mmdistill.training.stage_setup`: building one stage (trainable groups, optimiser,
  engine) and taking the student back out of it.
* :mod:`~mmdistill.training.loop`: one stage's training loop.
"""
