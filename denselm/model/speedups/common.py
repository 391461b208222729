"""The one way the speed-ups change a model for a scope: swap an attribute, always put it back.

    with swapped_forwards({layer: pass_through for layer in frozen}):   # prefix_cache
        backbone(**batch)
    # every layer runs its class's forward again, also when the body raised

Every speed-up that alters a block's behaviour does it by setting an instance
attribute (a block's ``forward``, a checkpointing function, a config field)
inside a ``with`` block and restoring the previous state on exit, exceptions
included.  Nothing is patched at class level, so other models of the same
class are untouched, and after the scope the model is exactly as it was:
``vars(module)`` and the config compare equal to before.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Any, Callable, Iterator, Mapping

from torch import nn


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read): speed-ups
    whose measured gain depends on the matrix units (AMX, AVX512-BF16) decide on them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@contextlib.contextmanager
def swapped(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.<name> = value`` for the scope; the previous state comes back on exit.

    A property (e.g. a transformers config's ``_attn_implementation``) is restored
    through its setter; an instance attribute to its old value; an attribute the
    instance did not hold (a module's ``forward`` comes from its class) is deleted,
    so the class's attribute shows through again.
    """
    if isinstance(inspect.getattr_static(type(obj), name, None), property):
        old = getattr(obj, name)
        restore: Callable[[], None] = lambda: setattr(obj, name, old)  # noqa: E731
    elif name in vars(obj):
        old = vars(obj)[name]
        restore = lambda: setattr(obj, name, old)  # noqa: E731
    else:
        restore = lambda: delattr(obj, name)  # noqa: E731
    setattr(obj, name, value)
    try:
        yield
    finally:
        restore()


@contextlib.contextmanager
def swapped_forwards(forwards: Mapping[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Each module's ``forward`` replaced by the given function for the scope (``module(x)``
    still runs the module's hooks around it); all restored on exit, exceptions included."""
    with contextlib.ExitStack() as stack:
        for module, forward in forwards.items():
            stack.enter_context(swapped(module, "forward", forward))
        yield


class SharedSwitch:
    """A swap several scopes may hold at once (nested calls, threads, a backward's recompute).

    The first scope to enter applies ``turn_on(key)``, which returns a function that
    undoes it; the last scope to leave calls that function.  Keys are compared by
    identity (one switch per backbone config).
    """

    def __init__(self, turn_on: Callable[[Any], Callable[[], None]]):
        self._turn_on = turn_on
        self._lock = threading.Lock()
        self._held: dict[int, tuple[int, Callable[[], None]]] = {}

    @contextlib.contextmanager
    def scope(self, key: Any) -> Iterator[None]:
        with self._lock:
            count, undo = self._held.get(id(key), (0, None))
            if count == 0:
                undo = self._turn_on(key)
            self._held[id(key)] = (count + 1, undo)
        try:
            yield
        finally:
            with self._lock:
                count, undo = self._held[id(key)]
                if count == 1:
                    del self._held[id(key)]
                    undo()
                else:
                    self._held[id(key)] = (count - 1, undo)

    def held(self, key: Any) -> bool:
        with self._lock:
            return id(key) in self._held
