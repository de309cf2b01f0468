"""Tasks the ART training loop can train, chosen by dataset (see :mod:`.base` for the interface).

* :class:`~hypersparse_jax.tasks.image.ImageClassification`: every dataset of
  :data:`hypersparse_jax.data.DATASET_NAMES`;
* :class:`~hypersparse_jax.tasks.language_model.LanguageModelling`: ``pysource``.
"""

from __future__ import annotations

from hypersparse_jax import data, sharding
from hypersparse_jax.data import pysource
from hypersparse_jax.tasks.base import Task
from hypersparse_jax.tasks.image import ImageClassification
from hypersparse_jax.tasks.language_model import LanguageModelling

# dataset name -> task class
TASKS: dict[str, type[Task]] = {
    **{name: ImageClassification for name in data.DATASET_NAMES},
    **{name: LanguageModelling for name in pysource.TEXT_DATASETS},
}

__all__ = ["TASKS", "Task", "ImageClassification", "LanguageModelling", "create_task"]


def create_task(config, placement: sharding.Placement, eval_batch_size: int) -> Task:
  """The task of ``config.dataset``, with its data loaded and its model built."""
  if config.dataset not in TASKS:
    raise ValueError(f"unknown dataset {config.dataset!r}; choose one of {list(TASKS)}")
  return TASKS[config.dataset](config, placement, eval_batch_size)
