"""Safe, offline demo tools (`glmkit chat --tools builtin`).  No shell tool, on purpose."""

from __future__ import annotations

import ast
import math
import operator
import random
from datetime import datetime, timezone
from typing import Annotated, Literal

from .tool_definitions import tool

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan, "log": math.log,
          "log10": math.log10, "exp": math.exp, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil}
_NAMES = {"pi": math.pi, "e": math.e}


def _arith(node):
    """Evaluate an arithmetic AST by walking it: numbers, + - * / // % **, a few math functions."""
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _arith(node.left), _arith(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or abs(left) > 1e100):
            raise ValueError("exponent too large")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_arith(node.operand))
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords and len(node.args) <= 2):
        return _FUNCS[node.func.id](*(_arith(a) for a in node.args))
    raise ValueError(f"unsupported expression element: {type(node).__name__}")


@tool
def calculator(expression: Annotated[str, "arithmetic expression, e.g. (3 + 4) * sqrt(2)"]) -> dict:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, sqrt, sin, cos, log, exp, pi, e)."""
    if len(expression) > 500:
        raise ValueError("expression too long")
    value = _arith(ast.parse(expression, mode="eval"))
    return {"expression": expression, "result": value}


@tool
def current_time(timezone_name: Annotated[Literal["local", "UTC"], "which clock"] = "local") -> dict:
    """The current date and time."""
    now = datetime.now(timezone.utc) if timezone_name == "UTC" else datetime.now().astimezone()
    return {"datetime": now.isoformat(timespec="seconds"), "weekday": now.strftime("%A")}


_LENGTH = {"m": 1.0, "km": 1000.0, "cm": 0.01, "mm": 0.001, "mi": 1609.344, "ft": 0.3048, "in": 0.0254, "yd": 0.9144}
_MASS = {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "oz": 0.028349523125, "t": 1000.0}


@tool
def convert_units(value: Annotated[float, "the quantity"], from_unit: Annotated[str, "e.g. km, lb, C"],
                  to_unit: Annotated[str, "e.g. mi, kg, F"]) -> dict:
    """Convert lengths (m km cm mm mi ft in yd), masses (kg g lb oz t) and temperatures (C F K)."""
    temps = {"C", "F", "K"}
    if from_unit in temps and to_unit in temps:
        c = {"C": value, "F": (value - 32) * 5 / 9, "K": value - 273.15}[from_unit]
        out = {"C": c, "F": c * 9 / 5 + 32, "K": c + 273.15}[to_unit]
    else:
        for table in (_LENGTH, _MASS):
            if from_unit in table and to_unit in table:
                out = value * table[from_unit] / table[to_unit]
                break
        else:
            raise ValueError(f"cannot convert {from_unit} to {to_unit}")
    return {"value": value, "from": from_unit, "to": to_unit, "result": round(out, 10)}


@tool
def random_number(seed: Annotated[int, "seed for reproducibility"] = 0,
                  range: Annotated[int, "upper bound (exclusive)"] = 100) -> dict:  # noqa: A002 (the demo's name)
    """A random integer in [0, range), as in the official tool demo."""
    return {"random": random.Random(seed).randrange(max(1, range))}


BUILTIN = [calculator, current_time, convert_units, random_number]
