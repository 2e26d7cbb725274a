"""The pieces of the distillation trainer; :mod:`mmdistill.trainer` is the recipe that uses them.

* :mod:`~mmdistill.training.schedule`: the learning-rate schedule, AdamW's parameter groups and a
  stage's length in optimiser steps.
"""
