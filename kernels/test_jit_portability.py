"""Source checks for what the GPU image's Triton (3.6.0) rejects and the local one (3.7.1)
accepts, so that a kernel that compiles here cannot fail on the chip for that reason."""
import ast
from pathlib import Path

KERNELS = sorted(Path(__file__).parent.rglob("*.py"))  # production and kernels/tuning/


def _jit_functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            yield node


def _string_constexpr_defaults(fn: ast.FunctionDef) -> list[str]:
    args = fn.args.args
    defaults = dict(zip([a.arg for a in args[len(args) - len(fn.args.defaults):]], fn.args.defaults))
    return [a.arg for a in args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)
            and isinstance(defaults.get(a.arg), ast.Constant) and isinstance(defaults[a.arg].value, str)]


def test_jit_helpers_take_no_string_constexpr_defaults():
    """Triton 3.6 cannot compile a call to a @triton.jit helper that leaves a string constexpr at
    its default ("'str' object has no attribute 'type'"); 3.7 can. A helper (a jit function that
    jit code calls) must take a flag instead. Kernels may keep one: their launches bind it."""
    found = []
    for path in KERNELS:
        tree = ast.parse(path.read_text())
        fns = list(_jit_functions(tree))
        called = {n.func.id for f in fns for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        found += [f"{path.name}:{f.name}({a})" for f in fns if f.name in called for a in _string_constexpr_defaults(f)]
    assert not found, found


def test_the_check_sees_a_string_default():
    """The check itself: a helper with a string constexpr default is found."""
    fn = ast.parse("@triton.jit\ndef h(x, M: tl.constexpr = '', N: tl.constexpr = 2):\n    pass").body[0]
    assert _string_constexpr_defaults(fn) == ["M"]

