"""Runs the examples in the public docstrings."""

import doctest

import pytest

from hypersparse_jax import budgets, channels, controller, masking, penalties, threshold, transform


@pytest.mark.parametrize("module", [masking, threshold, penalties, transform, controller, budgets,
                                    channels],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                           verbose=False)
  assert result.attempted > 0, f"{module.__name__} has no docstring examples"
  assert result.failed == 0
