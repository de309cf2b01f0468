"""Checks on lowered programs shared by the tests (not a test module)."""


def dynamic_control_flow(lowered):
  """While loops and branching ``case`` ops of a lowered program (StableHLO).

  ``lax.platform_dependent`` leaves a ``case`` whose branches only return constants (it picks
  the platform's branch index; XLA folds it) and a one-branch ``case``: neither is listed.
  """
  found = []

  def walk(op):
    op = op.operation
    if op.name == "stablehlo.while":
      found.append("while")
    if op.name == "stablehlo.case" and len(op.regions) > 1:
      if not all(o.operation.name in ("stablehlo.constant", "stablehlo.return")
                 for r in op.regions for b in r.blocks for o in b.operations):
        found.append("case")
    for r in op.regions:
      for b in r.blocks:
        for o in b.operations:
          walk(o)

  walk(lowered.compiler_ir("stablehlo").operation)
  return found
