"""Name → factory registries filled by decorators.

Every pluggable piece of kdcl (models, losses, datasets, curriculum scorers, pacing
functions, LR schedules) lives in a :class:`Registry`. Adding one is one decorated
function plus one YAML file in ``conf/``; nothing dispatches on names with if/else.

    MODELS = Registry("model")

    @MODELS.register("mlp")
    def mlp(num_classes, input_shape, hidden=(100, 100)): ...

    MODELS.create("mlp", num_classes=10, input_shape=(1, 8, 8))
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, TypeVar

from kdcl.errors import KdclError

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """A named collection of factories, filled with the :meth:`register` decorator."""

    def __init__(self, kind: str, entries: dict[str, Any] | None = None):
        self.kind = kind
        self._entries: dict[str, Any] = dict(entries or {})

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name]
        except KeyError:
            raise KdclError(
                f"unknown {self.kind} {name!r}",
                fix=f"choose one of: {', '.join(sorted(self._entries))}",
            ) from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
