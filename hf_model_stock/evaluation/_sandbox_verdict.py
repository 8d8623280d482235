"""Trusted test verdicts: the benchmark's assert lines are decided here, in the evaluator, not in the
sandbox. Each assert is split into a skeleton (comparisons, ``and``/``or``/``not``, calls of
``math``/``cmath`` functions, and every subexpression naming nothing but a few builtins: the expected
values) and leaves (the subexpressions that name the program's functions or anything else). The
sandbox evaluates each leaf when the
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
import cmath
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import CodeType, ModuleType
from typing import Any

from hf_model_stock.evaluation import _sandbox_wire

# The names an expected value may use and still be computed here: builtins that build or transform
# plain values. Anything else (the program's names, modules, open, getattr...) makes a leaf.
TRUSTED_NAMES = frozenset({
    "abs", "all", "any", "bool", "bytearray", "bytes", "chr", "complex", "dict", "divmod", "enumerate",
    "float", "frozenset", "int", "len", "list", "map", "max", "min", "ord", "pow", "range", "reversed",
    "round", "set", "slice", "sorted", "str", "sum", "tuple", "zip", "True", "False", "None",
})
_BUILTINS = {name: getattr(builtins, name) for name in TRUSTED_NAMES if hasattr(builtins, name)}
# Modules whose functions an assert may call on the program's values and that we call here instead:
# ``assert math.isclose(f(x), 2.5)`` asks the program for ``math`` (so that a program without the
# import fails as it would) and ``f(x)``, and calls the real ``math.isclose``.
MODULES = {"math": math, "cmath": cmath}
LEAF, MODULE = "_hfms_leaf", "_hfms_module"


@dataclass(frozen=True)
class Step:
    """One test line's statement: an assert to decide here (``skeleton``, ``leaves``), or another
    statement the sandbox runs (``statement``; its success is the sandbox's word)."""

    line: str
    skeleton: CodeType | None
    leaves: tuple[str, ...]
    statement: str | None = None


class UndecidableTest(ValueError):
    """A test line whose asserts the evaluator cannot decide itself (one inside a loop, say)."""


class LeafError(Exception):
    """A leaf raised in the sandbox, or its answer was missing or malformed."""


def plan_tests(tests: Sequence[str]) -> list[Step]:
    """The steps of the test lines, in order; ``SyntaxError`` if one does not parse, ``UndecidableTest``
    if one nests an assert in another statement."""
    steps = []
    for text in tests:
        for node in ast.parse(text).body:
            if not isinstance(node, ast.Assert):
                if any(isinstance(sub, ast.Assert) for sub in ast.walk(node)):
                    raise UndecidableTest(f"a test line holds an assert inside a statement, which only the "
                                          f"program could decide: {ast.unparse(node).splitlines()[0]}")
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
    namespace = {"__builtins__": _BUILTINS, LEAF: lambda i: leaf(step.leaves[i]), MODULE: _module}
    return bool(eval(step.skeleton, namespace))


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
    if _module_call(node):
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
        name = node.func.value
        node.func.value = ast.Call(ast.Name(MODULE, ast.Load()), [_leaf(name, leaves), ast.Constant(name.id)], [])
        node.args = [_split(arg, leaves) for arg in node.args]
        for keyword in node.keywords:
            keyword.value = _split(keyword.value, leaves)
        return node
    return _leaf(node, leaves)


def _leaf(node: ast.expr, leaves: list[str]) -> ast.expr:
    leaves.append(ast.unparse(node))
    return ast.copy_location(ast.Call(ast.Name(LEAF, ast.Load()), [ast.Constant(len(leaves) - 1)], []), node)


def _module_call(node: ast.expr) -> bool:
    """``math.isclose(...)`` and the like: a public function of a pure standard module, called by name."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
            and node.func.value.id in MODULES and not node.func.attr.startswith("_")
            and not any(isinstance(arg, ast.Starred) for arg in node.args))


def _module(value: Any, name: str) -> ModuleType:
    """The real module ``name`` where the program's own name for it is a module (as a real program's
    ``import math`` makes it); the program cannot patch ours."""
    if not isinstance(value, _sandbox_wire.Opaque) or value.type_name != "module":
        raise TypeError(f"{name} is not the {name} module in the program")
    return MODULES[name]


def _trusted(node: ast.expr) -> bool:
    """Whether ``node`` names only trusted builtins (and the variables of its own comprehensions and
    lambdas) and
    touches no private attribute. An expected value left to the sandbox would be answered by the
    program, which could then echo it for the program's side of the comparison too."""
    bound = {name.id for sub in ast.walk(node) if isinstance(sub, ast.comprehension)
             for name in ast.walk(sub.target) if isinstance(name, ast.Name)}
    bound |= {arg.arg for sub in ast.walk(node) if isinstance(sub, ast.Lambda)
              for arg in (*sub.args.posonlyargs, *sub.args.args, *sub.args.kwonlyargs,
                          *(a for a in (sub.args.vararg, sub.args.kwarg) if a is not None))}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id not in TRUSTED_NAMES and sub.id not in bound:
            return False
        if isinstance(sub, ast.Attribute) and sub.attr.startswith("_"):
            return False
        if isinstance(sub, ast.NamedExpr | ast.Await | ast.Yield | ast.YieldFrom):
            return False
    return True
