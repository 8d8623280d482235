"""Trusted test verdicts: the benchmark's assert lines are decided here, in the evaluator, not in the
sandbox. Each assert is split into a skeleton (comparisons, ``and``/``or``/``not``, and every
subexpression naming nothing but a few builtins: the expected values) and leaves (the subexpressions
that name the program's functions or anything else). The sandbox evaluates each leaf when the
skeleton asks for it, in Python's own order (short-circuits included), and sends back its value
(``_sandbox_wire``); the skeleton runs here on those values. So a program that exits, hooks, traces or
re-runs itself sends no values and fails, and one that answers in our place must still answer the
right values without seeing the expected ones.

>>> plan = plan_tests(["assert add(2, 3) == 5"])
>>> plan[0].leaves
('add(2, 3)',)
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import CodeType
from typing import Any

# The names an expected value may use and still be computed here: builtins that build or transform
# plain values. Anything else (the program's names, modules, open, getattr...) makes a leaf.
TRUSTED_NAMES = frozenset({
    "abs", "all", "any", "bool", "bytearray", "bytes", "chr", "complex", "dict", "divmod", "enumerate",
    "float", "frozenset", "int", "len", "list", "map", "max", "min", "ord", "pow", "range", "reversed",
    "round", "set", "slice", "sorted", "str", "sum", "tuple", "zip", "True", "False", "None",
})
_BUILTINS = {name: getattr(builtins, name) for name in TRUSTED_NAMES if hasattr(builtins, name)}
LEAF = "_hfms_leaf"


@dataclass(frozen=True)
class Step:
    """One test line's statement: an assert to decide here (``skeleton``, ``leaves``), or another
    statement the sandbox runs (``statement``; its success is the sandbox's word)."""

    line: str
    skeleton: CodeType | None
    leaves: tuple[str, ...]
    statement: str | None = None


class LeafError(Exception):
    """A leaf raised in the sandbox, or its answer was missing or malformed."""


def plan_tests(tests: Sequence[str]) -> list[Step]:
    """The steps of the test lines, in order; ``SyntaxError`` if one does not parse."""
    steps = []
    for text in tests:
        for node in ast.parse(text).body:
            if not isinstance(node, ast.Assert):
                steps.append(Step(ast.unparse(node), None, (), statement=ast.unparse(node)))
                continue
            line, leaves = ast.unparse(node), list[str]()
            skeleton = ast.Expression(_split(node.test, leaves))
            code = compile(ast.fix_missing_locations(skeleton), "<test>", "eval")
            steps.append(Step(line, code, tuple(leaves)))
    return steps


def decide(step: Step, leaf: Callable[[str], Any]) -> bool:
    """Whether the assert ``step`` holds, asking ``leaf(source)`` for each leaf's value as the skeleton
    needs it. Raises ``LeafError`` (from ``leaf``) or whatever the skeleton raises on those values."""
    if step.skeleton is None:
        raise ValueError(f"not an assert: {step.line}")
    return bool(eval(step.skeleton, {"__builtins__": _BUILTINS, LEAF: lambda i: leaf(step.leaves[i])}))


def _split(node: ast.expr, leaves: list[str]) -> ast.expr:
    if _trusted(node):
        return node
    if isinstance(node, ast.Compare):
        node.left = _split(node.left, leaves)
        node.comparators = [_split(c, leaves) for c in node.comparators]
        return node
    if isinstance(node, ast.BoolOp):
        node.values = [_split(v, leaves) for v in node.values]
        return node
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        node.operand = _split(node.operand, leaves)
        return node
    leaves.append(ast.unparse(node))
    return ast.copy_location(ast.Call(ast.Name(LEAF, ast.Load()), [ast.Constant(len(leaves) - 1)], []), node)


def _trusted(node: ast.expr) -> bool:
    """Whether ``node`` names only trusted builtins and touches no private attribute."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id not in TRUSTED_NAMES:
            return False
        if isinstance(sub, ast.Attribute) and sub.attr.startswith("_"):
            return False
        if isinstance(sub, ast.NamedExpr | ast.Lambda | ast.Await | ast.Yield | ast.YieldFrom):
            return False
    return True
