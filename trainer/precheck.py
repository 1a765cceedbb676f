"""Static checks on a variant before any process starts: an accident detector, not a boundary.

Cheap and conservative: a variant that fails here never runs. It catches syntax errors and the
obvious attempts at cheating (touching prepare.py or its functions, the held-out split, evo's own
settings) early and with a clear reason. The boundary is elsewhere: the sandbox and the evaluator.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    status: str  # "syntax" or "tampered", as in the runner's result record
    reason: str


# Settings a variant may read but never set: they belong to the runner.
_ENV_WRITERS = {"putenv", "setdefault", "update", "pop", "__setitem__", "__delitem__", "unsetenv", "clear"}


def _strings(tree: ast.AST):
    """String constants that can reach running code (docstrings and other bare strings cannot)."""
    inert = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inert:
            yield node


def _is_prepare(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "prepare"


def _prepare_path(node: ast.AST) -> str | None:
    """'prepare.a.b' for an attribute chain rooted at the prepare module, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if parts and _is_prepare(node):
        return ".".join(["prepare", *reversed(parts)])
    return None


def _refusal(node: ast.AST, what: str) -> Refusal:
    return Refusal("tampered", f"line {getattr(node, 'lineno', '?')}: {what}")


def precheck(code: str, filename: str = "train.py") -> Refusal | None:
    """None when the code may run; otherwise why not."""
    try:
        tree = ast.parse(code, filename=filename)
        compile(tree, filename, "exec")
    except SyntaxError as e:
        return Refusal("syntax", f"line {e.lineno}: {e.msg}")
    except ValueError as e:  # e.g. null bytes in the source
        return Refusal("syntax", str(e))

    for node in _strings(tree):
        text = node.value
        if "heldout" in text.lower() or "held_out" in text.lower():
            return _refusal(node, "mentions the held-out split; variants never read it")
        if "prepare.py" in text:
            return _refusal(node, "names prepare.py; variants must not read or write it")

    for node in ast.walk(tree):
        # prepare.anything = ... / del prepare.anything / setattr(prepare, ...): monkeypatching.
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and _is_prepare(target.value):
                return _refusal(node, f"assigns prepare.{target.attr}; prepare's API is fixed during a run")
            if isinstance(target, ast.Subscript) and _evo_key(target.slice):
                return _refusal(node, "sets an EVO_ environment variable; settings come from the runner")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in {"setattr", "delattr"} and node.args and _is_prepare(node.args[0]):
                return _refusal(node, f"{func.id}() on prepare; prepare's API is fixed during a run")
            if isinstance(func, ast.Attribute) and func.attr in _ENV_WRITERS and _passes_evo_key(node):
                return _refusal(node, "sets an EVO_ environment variable; settings come from the runner")
        dotted = _prepare_path(node)
        if dotted and any(part.startswith("_") for part in dotted.split(".")[1:]):
            return _refusal(node, f"uses {dotted}; variants use prepare's public API only")
    return None


def _evo_key(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("EVO_")


def _passes_evo_key(call: ast.Call) -> bool:
    """An EVO_ name anywhere in the arguments: putenv("EVO_X"), update({"EVO_X": 1}), update(EVO_X=1)."""
    if any(k.arg and k.arg.startswith("EVO_") for k in call.keywords):
        return True
    return any(_evo_key(n) for arg in [*call.args, *(k.value for k in call.keywords)] for n in ast.walk(arg))
