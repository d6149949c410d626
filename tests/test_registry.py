"""Registries: entries by name, and the traits that set an entry apart (instead of a test of its name)."""

from __future__ import annotations

import pytest

from kdcl.errors import KdclError
from kdcl.registry import Registry


def test_entries_and_their_traits():
    things = Registry("thing", traits={"special": False, "size": 1})

    @things.register("plain")
    def plain() -> str:
        return "plain"

    things.register("big", special=True, size=3)(lambda: "big")
    assert things.names() == ["big", "plain"] and "big" in things and list(things) == ["big", "plain"]
    assert things.create("plain") == "plain"
    assert (things.trait("plain", "special"), things.trait("plain", "size")) == (False, 1)  # the defaults
    assert (things.trait("big", "special"), things.trait("big", "size")) == (True, 3)
    with pytest.raises(KdclError, match="unknown thing 'small'") as err:
        things.trait("small", "special")
    assert err.value.fix == "choose one of: big, plain"
    with pytest.raises(KeyError, match="colour"):
        things.trait("big", "colour")


def test_an_entry_declares_only_its_registrys_traits():
    things = Registry("thing", traits={"special": False})
    with pytest.raises(ValueError, match=r"'odd' declares unknown trait\(s\) colour \(a thing may declare: special\)"):
        things.register("odd", colour="red")
    with pytest.raises(ValueError, match="declares unknown trait"):
        Registry("plain thing").register("odd", special=True)
    things.register("once")(print)
    with pytest.raises(ValueError, match="registered twice"):
        things.register("once")(print)
