"""Name → factory registries filled by decorators.

Every pluggable piece of kdcl (models, losses, datasets, curriculum scorers, pacing
functions, LR schedules) lives in a :class:`Registry`. Adding one is one decorated
function plus one YAML file in ``conf/``; nothing dispatches on names with if/else.

    MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

    @MODELS.register("mlp")
    def mlp(num_classes, input_shape, hidden=(100, 100)): ...

    MODELS.create("mlp", num_classes=10, input_shape=(1, 8, 8))

What sets an entry apart from the others of its registry is a *trait* it declares when
it registers, not a test of its name elsewhere. A registry lists the traits its entries
may declare, with their defaults; code asks :meth:`Registry.trait`:

    SCORERS = Registry("curriculum scorer", traits={"needs_student_model": False})

    @SCORERS.register("self_taught", needs_student_model=True)
    def self_taught(ctx): ...

    SCORERS.trait(cfg["curriculum"]["scorer"], "needs_student_model")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from kdcl.errors import KdclError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of entries of type ``T`` (factories, classes, functions), filled
    with the :meth:`register` decorator.

    ``traits``: the properties an entry may declare (``register(name, trait=value)``) and
    their values for an entry that does not."""

    def __init__(self, kind: str, entries: dict[str, T] | None = None, traits: dict[str, Any] | None = None):
        self.kind = kind
        self.defaults: dict[str, Any] = dict(traits or {})
        self._entries: dict[str, T] = dict(entries or {})
        self._traits: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **traits: Any) -> Callable[[T], T]:
        unknown = sorted(set(traits) - set(self.defaults))
        if unknown:
            declared = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(
                f"{self.kind} {name!r} declares unknown trait(s) {', '.join(unknown)} "
                f"(a {self.kind} may declare: {declared})"
            )

        def decorator(fn: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            self._traits[name] = traits
            return fn

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KdclError(
                f"unknown {self.kind} {name!r}",
                fix=f"choose one of: {', '.join(sorted(self._entries))}",
            ) from None

    def trait(self, name: str, trait: str) -> Any:
        """The value of ``trait`` for entry ``name``: as it registered, else the registry's
        default. An unknown name is the :meth:`get` error; an undeclared trait a bug."""
        self.get(name)
        if trait not in self.defaults:
            raise KeyError(f"{self.kind} entries have no trait {trait!r}")
        return self._traits.get(name, {}).get(trait, self.defaults[trait])

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        entry: Any = self.get(name)
        return entry(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
