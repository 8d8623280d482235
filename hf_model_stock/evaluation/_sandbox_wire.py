"""Values between the sandboxed program and the evaluator, as JSON (stdlib only: the sandbox child
imports it too). ``encode`` runs in the sandbox; ``decode`` runs in the evaluator and builds plain
values only (numbers, strings, bytes, containers, ``Decimal``, ``Fraction``, ``deque``,
``OrderedDict``, ``Counter``), never running code of the program: any other object arrives as an
``Opaque`` that equals only itself and keeps the truth value the sandbox reported.
"""

import collections
import sys
from typing import Any

MAX_DEPTH = 100
MAX_HASHED = 10_000
MAX_ALIKE = 16  # keys of one set or dict that may share a hash
_PLAIN = (bool, int, float, complex, str, bytes, bytearray, list, tuple, set, frozenset, dict)
_ITER: dict[type, Any] = {list: list.__iter__, tuple: tuple.__iter__, set: set.__iter__, frozenset: frozenset.__iter__}


class Opaque:
    """A value the evaluator cannot rebuild: equal to itself only, truthy as the program said."""

    def __init__(self, type_name: str, truth: bool) -> None:
        self.type_name, self.truth = type_name, truth

    def __bool__(self) -> bool:
        return self.truth

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


def encode(value: Any, depth: int = 0) -> Any:
    """A JSON-able, tagged form of ``value`` (``ValueError`` past ``MAX_DEPTH``, i.e. cycles too)."""
    if depth > MAX_DEPTH:
        raise ValueError("sandbox: value nested too deeply to report")
    if value is None:
        return ["none"]
    kind: type | None = type(value) if type(value) in _PLAIN else _known_subclass(value)
    if kind is None:
        return _other(value, depth)
    # the base type's own methods throughout: a subclass's __str__, __int__ or __iter__ cannot change
    # what is reported, which is what the base type's __eq__ (kept, as checked above) compares
    if kind is bool:
        return ["bool", int.__index__(value) == 1]
    if kind is int:
        return ["int", format(int.__index__(value), "x")]
    if kind is float:
        return ["float", float.hex(value)]
    if kind is complex:
        return ["complex", float.hex(complex.real.__get__(value)), float.hex(complex.imag.__get__(value))]
    if kind is str:
        return ["str", str.__str__(value)]
    if kind in (bytes, bytearray):
        return [kind.__name__, kind.hex(value)]
    if kind is dict:
        return ["dict", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]]
    return [kind.__name__, [encode(item, depth + 1) for item in _ITER[kind](value)]]


def _known_subclass(value: Any) -> type | None:
    """The plain type whose equality ``value`` keeps (namedtuple, defaultdict, IntEnum...), or None."""
    for base in _PLAIN:
        if isinstance(value, base) and type(value).__eq__ is base.__eq__ and type(value).__hash__ is base.__hash__:
            return base
    return None


def _other(value: Any, depth: int) -> Any:
    if isinstance(value, collections.Counter | collections.OrderedDict):
        tag = "counter" if isinstance(value, collections.Counter) else "odict"
        return [tag, [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]]
    if isinstance(value, collections.deque):
        return ["deque", [encode(item, depth + 1) for item in value]]
    decimal, fractions = sys.modules.get("decimal"), sys.modules.get("fractions")  # none unless imported
    if decimal is not None and isinstance(value, decimal.Decimal):
        return ["decimal", str(value)]
    if fractions is not None and isinstance(value, fractions.Fraction):
        return ["fraction", encode(value.numerator), encode(value.denominator)]
    if isinstance(value, range):
        return ["range", encode(value.start), encode(value.stop), encode(value.step)]
    try:
        truth = bool(value)
    except Exception:
        truth = True
    return ["opaque", type(value).__qualname__[:100], truth]


def decode(data: Any, depth: int = 0) -> Any:
    """The value ``encode`` described; ``ValueError`` for anything malformed, or for a set or dict of
    more than ``MAX_HASHED`` entries (colliding hashes would make building it quadratic)."""
    if depth > MAX_DEPTH or not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise ValueError("malformed value")
    tag, args = data[0], data[1:]
    try:
        return _DECODERS[tag](args, depth + 1)
    except (KeyError, TypeError, IndexError, ValueError, ArithmeticError) as error:
        raise ValueError(f"malformed value ({tag!r})") from error


def _one(args: list) -> Any:
    (value,) = args
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _items(args: list, depth: int) -> list:
    if len(args) != 1 or not isinstance(args[0], list):
        raise TypeError("not a list")
    return [decode(item, depth) for item in args[0]]


def _hashed(args: list, depth: int) -> list:
    if len(args) != 1 or not isinstance(args[0], list) or len(args[0]) > MAX_HASHED:
        raise TypeError("not a list, or too long")
    return _spread(_items(args, depth))


def _spread(keys: list) -> list:
    """``keys``, unless many share one hash (crafted ints such as multiples of 2**61 - 1, whose set
    would take the evaluator seconds to build: a program's real set or dict of distinct values has
    at most a few alike)."""
    if len(keys) > MAX_ALIKE and max(collections.Counter(map(hash, keys)).values()) > MAX_ALIKE:
        raise ValueError("too many keys with one hash")
    return keys


def _pairs(args: list, depth: int) -> list[tuple[Any, Any]]:
    if len(args) != 1 or not isinstance(args[0], list) or len(args[0]) > MAX_HASHED:
        raise TypeError("not a list, or too long")
    pairs = []
    for pair in args[0]:
        if not isinstance(pair, list) or len(pair) != 2:
            raise TypeError("not a pair")
        pairs.append((decode(pair[0], depth), decode(pair[1], depth)))
    _spread([key for key, _ in pairs])
    return pairs


def _opaque(args: list, depth: int) -> Opaque:
    name, truth = args
    if not isinstance(truth, bool):
        raise TypeError("not a bool")
    return Opaque(_str(name)[:100], truth)


def _bool(args: list, depth: int) -> bool:
    (value,) = args
    if not isinstance(value, bool):
        raise TypeError("not a bool")
    return value


_DECODERS = {
    "none": lambda args, depth: None,
    "bool": _bool,
    "int": lambda args, depth: int(_str(_one(args)), 16),
    "float": lambda args, depth: float.fromhex(_str(args[0])),
    "complex": lambda args, depth: complex(float.fromhex(_str(args[0])), float.fromhex(_str(args[1]))),
    "str": lambda args, depth: _str(args[0]),
    "bytes": lambda args, depth: bytes.fromhex(_str(args[0])),
    "bytearray": lambda args, depth: bytearray.fromhex(_str(args[0])),
    "list": lambda args, depth: _items(args, depth),
    "tuple": lambda args, depth: tuple(_items(args, depth)),
    "set": lambda args, depth: set(_hashed(args, depth)),
    "frozenset": lambda args, depth: frozenset(_hashed(args, depth)),
    "dict": lambda args, depth: dict(_pairs(args, depth)),
    "odict": lambda args, depth: collections.OrderedDict(_pairs(args, depth)),
    "counter": lambda args, depth: collections.Counter(dict(_pairs(args, depth))),
    "deque": lambda args, depth: collections.deque(_items(args, depth)),
    "decimal": lambda args, depth: __import__("decimal").Decimal(_str(_one(args))),
    "fraction": lambda args, depth: __import__("fractions").Fraction(_int(args[0], depth), _int(args[1], depth)),
    "range": lambda args, depth: range(*(_int(a, depth) for a in args)),
    "opaque": _opaque,
}


def _int(data: Any, depth: int) -> int:
    value = decode(data, depth)
    if type(value) is not int:
        raise TypeError("not an int")
    return value
