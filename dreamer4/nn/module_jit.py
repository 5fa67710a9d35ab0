"""`module_jit`: jax.jit of fn(module, *args) that walks the module's graph once per module, not once per call.

`nnx.jit` splits the module into (graphdef, state) and merges it back on every call, in Python:
for the classic dynamics (12 layers, ~580 graph nodes) that costs ~14 ms of host time per call on
a CPU core (the GPU suite measured ~24 ms per imagined frame whatever K and batch, issue 17),
more than the whole cached forward pass of a frame on an H100. Per-frame calls (imagination,
`dynamics.sampler.generate_step`) cannot afford it.

flax's own remedy, `nnx.cached_partial(nnx.jit(fn), module)`, still cost 2.8-3.2 ms per empty
call on the same module (flax 0.12.8, CPU, 2026-11-26) against 0.16 ms here: about as much as a
K=4 frame on an H100 (3.25 ms), so it is not enough for per-frame calls.

`module_jit(fn)` keeps, per module (weakly referenced; shared by all module_jit functions), its
graphdef, the tree structure of its state and the list of its Variable objects, found by one
`nnx.split` at the module's first call.
Each call then reads the Variables' current values (a flat list; no graph walk) and calls one
`jax.jit` function of (graphdef and treedef (static), values, *args) that rebuilds the module
inside the trace (`nnx.merge`, at trace time only). So:
  * in-place updates of the module's Variables (`nnx.update`, an optimizer step, loading a
    checkpoint into it) are seen by the next call: values are read on every call;
  * the module is read-only inside fn: Variable writes inside fn are not propagated back (use
    nnx.jit for functions that update their module);
  * the module's *structure* must not change after its first call (a submodule or Variable
    replaced by a new object would not be seen); `forget(module)` drops its entry.
Static and donated arguments are named as in jax.jit; fn's parameters must be plain
(no *args / **kwargs) so every call maps onto positions.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import jax
from flax import nnx


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class _Static:
    """(graphdef, treedef) as one static jit argument with a precomputed hash: hashing a graphdef
    walks it (~1 ms for the classic dynamics), and jax.jit hashes its static arguments on every call."""

    __slots__ = ("graphdef", "treedef", "_hash")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        if self is other:
            return True
        return (
            isinstance(other, _Static)
            and self._hash == other._hash
            and (self.graphdef, self.treedef) == (other.graphdef, other.treedef)
        )


class _Parts:
    """One module's cached split: static = (graphdef, treedef of its state); its Variable objects."""

    __slots__ = ("ref", "static", "variables")

    def __init__(self, module):
        graphdef, state = nnx.split(module)
        variables = jax.tree.leaves(state, is_leaf=_is_variable)
        values, treedef = jax.tree.flatten(state)
        if not all(_is_variable(v) for v in variables):  # a flax whose State holds copies: no cache
            raise TypeError("state leaves are not the module's Variables")
        self.static = _Static(graphdef, treedef)
        self.variables = tuple(variables)
        # the same leaves in the same order as `values`: check once
        if len(jax.tree.leaves(self.variables)) != len(values):
            raise TypeError("Variable values are not flat arrays")
        self.ref = None

    def values(self):
        return jax.tree.leaves(self.variables)


# id(module) -> its _Parts, shared by every module_jit function (a module is split once in all);
# an entry leaves when its module is garbage-collected.
_PARTS: dict[int, _Parts] = {}


def _lookup(module) -> _Parts | None:
    parts = _PARTS.get(id(module))
    if parts is not None and parts.ref() is module:
        return parts
    try:
        parts = _Parts(module)
        key = id(module)
        parts.ref = weakref.ref(module, lambda _, key=key: _PARTS.pop(key, None))
    except TypeError:  # not weakly referable, or a flax whose State copies Variables
        return None
    _PARTS[key] = parts
    return parts


def forget(module) -> None:
    """Drop the cached split of `module` (after changing its structure: new submodules or Variables)."""
    _PARTS.pop(id(module), None)


class ModuleJit:
    """See the module doc. Call as fn would be called: jitted(module, *args, **kwargs)."""

    def __init__(self, fn, static_argnames=(), donate_argnames=()):
        functools.update_wrapper(self, fn)
        self.fn = fn
        params = list(inspect.signature(fn).parameters.values())
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            raise TypeError(f"module_jit needs plain parameters, {fn.__name__} has *args or **kwargs")
        self._sig = inspect.signature(fn)
        self._names = [p.name for p in params[1:]]  # after the module
        static_argnames, donate_argnames = set(static_argnames), set(donate_argnames)
        unknown = (static_argnames | donate_argnames) - set(self._names)
        if unknown:
            raise ValueError(f"{fn.__name__} has no parameters {sorted(unknown)}")
        # pure(static, values, *args): argument i of fn (after the module) sits at position 2 + i
        self._jit = jax.jit(
            self._pure,
            static_argnums=(0,) + tuple(2 + i for i, n in enumerate(self._names) if n in static_argnames),
            donate_argnums=tuple(2 + i for i, n in enumerate(self._names) if n in donate_argnames),
        )

    def _pure(self, static, values, *args):
        return self.fn(nnx.merge(static.graphdef, jax.tree.unflatten(static.treedef, values)), *args)

    def _args(self, module, args, kwargs):
        bound = self._sig.bind(module, *args, **kwargs)
        bound.apply_defaults()
        return [bound.arguments[n] for n in self._names]

    def _static_values(self, module):
        parts = _lookup(module)
        if parts is None:  # uncacheable module: split on every call (correct, slow)
            graphdef, state = nnx.split(module)
            values, treedef = jax.tree.flatten(state)
            return _Static(graphdef, treedef), values
        return parts.static, parts.values()

    def __call__(self, module, *args, **kwargs):
        static, values = self._static_values(module)
        return self._jit(static, values, *self._args(module, args, kwargs))

    def lower(self, module, *args, **kwargs):
        """jax.jit's lower, for compile timing and cost analysis."""
        static, values = self._static_values(module)
        return self._jit.lower(static, values, *self._args(module, args, kwargs))


def module_jit(fn=None, *, static_argnames=(), donate_argnames=()):
    """Decorator: `@module_jit` or `@module_jit(static_argnames=..., donate_argnames=...)`; see the module doc."""
    if fn is None:
        return functools.partial(module_jit, static_argnames=static_argnames, donate_argnames=donate_argnames)
    if isinstance(static_argnames, str):
        static_argnames = (static_argnames,)
    if isinstance(donate_argnames, str):
        donate_argnames = (donate_argnames,)
    return ModuleJit(fn, static_argnames, donate_argnames)
