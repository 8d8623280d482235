"""The values a sandboxed program reports travel as plain data: what the evaluator rebuilds is what the
base type's own equality would compare, whatever the program's subclasses pretend, and an answer
crafted to make the evaluator slow is refused instead of built. Also: test lines whose asserts only the
program could decide are refused, and the evaluator may hold more than 1024 descriptors."""

from __future__ import annotations

import json
import os
import resource
import select
from collections.abc import Iterator

import pytest

from hf_model_stock.evaluation import _sandbox_verdict
from hf_model_stock.evaluation import _sandbox_wire as wire
from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.sandbox import Limits, run_program

FAST = Limits(timeout_s=4.0, cpu_s=3, memory_bytes=512 << 20, output_bytes=64 << 10)
COLLIDING = [i * ((1 << 61) - 1) for i in range(1, 2001)]  # CPython hashes all of these to 0


def _round_trip(value: object) -> object:
    return wire.decode(json.loads(json.dumps(wire.encode(value))))


LYING = (  # subclasses that keep the base type's __eq__ but lie through the methods a naive encoder calls
    "class S(str):\n    def __str__(self):\n        return 'lie'\n"
    "class L(list):\n    def __iter__(self):\n        return iter([9])\n"
    "class I(int):\n    def __int__(self):\n        return 7\n    def __index__(self):\n        return 7\n"
    "class F(float):\n    def __float__(self):\n        return 7.0\n"
    "class T(tuple):\n    def __iter__(self):\n        return iter(())\n"
)


def test_subclasses_are_reported_by_their_real_value() -> None:
    namespace: dict = {}
    exec(LYING, namespace)
    values = [namespace["S"]("ab"), namespace["L"]([1, 2]), namespace["I"](3), namespace["F"](0.5),
              namespace["T"]((1,))]
    assert values == ["ab", [1, 2], 3, 0.5, (1,)]  # what the program's own == says
    assert _round_trip(values) == ["ab", [1, 2], 3, 0.5, (1,)]
    assert [type(v) for v in _round_trip(values)] == [str, list, int, float, tuple]  # type: ignore[attr-defined]


def test_a_program_returning_lying_subclasses_gets_the_plain_verdict() -> None:
    program = LYING + "def f():\n    return S('ab'), L([1, 2]), I(3), F(0.5), T((1,))\n"
    result = run_program(program, FAST, tests=["assert f() == ('ab', [1, 2], 3, 0.5, (1,))"])
    assert result.status == "passed", result


@pytest.mark.parametrize("kind", ["set", "frozenset", "dict", "counter", "odict"])
def test_keys_crafted_to_share_one_hash_are_refused(kind: str) -> None:
    assert len({hash(i) for i in COLLIDING}) == 1  # control: they do collide
    keys = [wire.encode(i) for i in COLLIDING]
    data = [kind, [[key, ["none"]] for key in keys]] if kind in ("dict", "counter", "odict") else [kind, keys]
    with pytest.raises(ValueError, match="malformed"):
        wire.decode(json.loads(json.dumps(data)))


def test_real_sets_and_dicts_still_round_trip() -> None:
    values = [set(range(10_000)), {-1, -2}, {i: str(i) for i in range(5000)}, frozenset({(1, 2), (2, 1)}),
              set(COLLIDING[:16])]
    assert _round_trip(values) == values


def test_a_colliding_answer_fails_the_sample() -> None:
    program = "def f():\n    return {i * ((1 << 61) - 1) for i in range(1, 5001)}\n"
    result = run_program(program, FAST, tests=["assert f() == set()"])
    assert (result.status, result.reason) == ("failed", "assert f() == set(): the program's answer was malformed")


def test_an_assert_inside_a_loop_is_refused_not_left_to_the_program() -> None:
    tests = ["for x in (1, 2):\n    assert add(x, 0) == x"]
    with pytest.raises(EvalError, match=r"^mbpp: a test line holds an assert inside a statement.*: for x in \(1, 2\):$"):
        run_program("def add(a, b):\n    return a + b\n", FAST, tests=tests)


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """This process holding over 1024 descriptors, as a long evaluation may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip("the hard descriptor limit is below 1300 here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    yield
    for fd in fds:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_evaluator_may_hold_over_1024_descriptors(many_descriptors: None) -> None:
    high = os.open(os.devnull, os.O_RDONLY)
    try:
        assert high >= 1024
        with pytest.raises(ValueError):  # control: select() cannot wait on such a descriptor
            select.select([high], [], [], 0)
    finally:
        os.close(high)
    result = run_program("def add(a, b):\n    return a + b\n", FAST, tests=["assert add(2, 3) == 5"])
    assert result.status == "passed", result



# Answers each leaf honestly, except that where its own function gives None it sends the previous
# leaf's answer: an expected value asked of the program would come back as its own answer.
ECHO = ("import sys\nwire = sys.modules['_sandbox_wire']\nhonest, last = wire.encode, []\n"
        "def echo(value, depth=0):\n    if value is None and last:\n        return last[-1]\n"
        "    last.append(honest(value, depth))\n    return last[-1]\n"
        "wire.encode = echo\ndef squares(n):\n    return None\n")


@pytest.mark.parametrize("test", ["assert [x * x for x in range(3)] == squares(3)",
                                  "assert list(map(lambda x: x * x, range(3))) == squares(3)"])
def test_an_expected_value_is_computed_here_not_asked_of_the_program(test: str) -> None:
    """A comprehension's and a lambda's own variables are trusted names, so the expected value is no
    leaf and the program never sees it."""
    assert _sandbox_verdict.plan_tests([test])[0].leaves == ("squares(3)",)
    result = run_program(ECHO, FAST, tests=[test])
    assert (result.status, result.reason) == ("failed", f"failed: {test}")
    honest = ECHO.replace("return None", "return [0, 1, 4]")
    assert run_program(honest, FAST, tests=[test]).status == "passed"
    # control: an expected value that is a leaf (a name of the program's) does come back as the answer
    assert run_program(ECHO + "SQUARES = [0, 1, 4]\n", FAST, tests=["assert SQUARES == squares(3)"]).status == "passed"
