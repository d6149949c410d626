"""What a file may make kdcl run: nothing.

Checkpoints, stage-cache entries, recorded teacher logits and saved run configs come from
disk, and a disk holds files from elsewhere. They may hold weights and plain values; code is
named by the user alone:

- A ``_target_`` (an import path of a model builder) read from a file is called only when
  the user's own config names the same path (``teacher._target_=my_pkg.nets.build`` on the
  command line or in a config file of theirs), or ``trust_code`` allows it: ``true`` for
  any, or a list of import paths. :class:`CodePolicy` decides.
- Keyword arguments read from a file are plain values (numbers, strings, booleans, None,
  lists and mappings of them), checked by the builder's signature as the user's are.
- ``trust_remote_code`` (the Python a Hugging Face repository ships, its ``auto_map``) is
  never read from a file: kdcl passes ``trust_remote_code=False`` to every transformers
  load, unless the user's model spec says ``trust_remote_code: true``
  (:func:`remote_code_refused` turns transformers' refusal into one message).
- A saved run config (``kdcl train resume=DIR``) is a file too: its ``_target_``s and
  ``trust_remote_code: true``s are checked against the user's command line before anything
  runs (:func:`check_saved_config`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kdcl.errors import KdclError

TARGET_KEY = "_target_"
REMOTE_CODE_KEY = "trust_remote_code"
PLAIN_TYPES = (str, int, float, bool, type(None))


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every (dotted path, key, value) of the mappings nested in ``value`` (lists indexed)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            where = f"{path}.{k}" if path else str(k)
            yield where, k, v
            yield from _walk(v, where)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")


def targets_in(config: Mapping[str, Any]) -> dict[str, str]:
    """Every ``_target_`` that names code in ``config``: dotted path → import path."""
    return {where: v for where, k, v in _walk(config) if k == TARGET_KEY and isinstance(v, str) and v}


def remote_code_in(config: Mapping[str, Any]) -> list[str]:
    """The dotted paths of ``config`` that allow remote code (``trust_remote_code: true``)."""
    return [where for where, k, v in _walk(config) if k == REMOTE_CODE_KEY and v is True]


def trust_code_rule(value: Any) -> bool:
    """The range of ``trust_code``: a boolean, or a list of import paths."""
    return isinstance(value, bool) or (
        isinstance(value, list) and all(isinstance(p, str) and "." in p.strip(".") for p in value)
    )


@dataclass(frozen=True)
class CodePolicy:
    """The import paths a file may name and kdcl then calls: those the user's config names
    itself (``named``), those ``trust_code`` lists, or any when ``trust_code`` is true."""

    named: frozenset[str] = frozenset()
    any_target: bool = False

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> CodePolicy:
        """The policy of the user's (composed) config: its ``_target_``s and ``trust_code``."""
        trust = config.get("trust_code", False)
        listed = frozenset(trust) if isinstance(trust, list) else frozenset()
        return cls(named=frozenset(targets_in(config).values()) | listed, any_target=trust is True)

    def check_target(self, target: str, where: str) -> None:
        """Refuse to call ``target``, named by the file ``where``, unless the user named it."""
        if self.any_target or target in self.named:
            return
        raise KdclError(
            f"{where} names code to run, _target_={target}, and kdcl calls code a file names only "
            "when you name it yourself; nothing was imported",
            fix=f"if you trust {target}, add trust_code=[{target}] to the command (or the same "
            f"_target_ in your config: teacher._target_={target}); otherwise use another file",
        )


def check_plain_kwargs(kwargs: Any, where: str) -> dict[str, Any]:
    """``kwargs`` read from a file: a mapping of plain values, without ``trust_remote_code``."""
    if not isinstance(kwargs, Mapping):
        raise KdclError(
            f"{where}: the model's kwargs are a {type(kwargs).__name__}, not a mapping",
            fix="use a checkpoint written by kdcl train",
        )
    odd = [w for w, _, v in _walk(kwargs) if not isinstance(v, (*PLAIN_TYPES, list, tuple, Mapping))]
    if odd:
        raise KdclError(
            f"{where}: the model's kwargs hold values that are not plain numbers, strings or "
            f"lists ({', '.join(odd[:4])})",
            fix="use a checkpoint written by kdcl train",
        )
    if remote_code_in(kwargs) or REMOTE_CODE_KEY in kwargs:
        raise KdclError(
            f"{where} asks for trust_remote_code in the model's kwargs; kdcl never takes that from a file",
            fix="set trust_remote_code=true on the model spec of your own command "
            "(teacher.trust_remote_code=true) if you trust that model's code",
        )
    return dict(kwargs)


def check_saved_config(saved: Mapping[str, Any], user: Mapping[str, Any], where: str) -> None:
    """A saved run config (``resume=DIR``) names code only as far as the user's own command
    does: each ``_target_`` of ``saved`` is one the user names (or ``trust_code`` allows),
    and each ``trust_remote_code: true`` of ``saved``, and its ``trust_code``, the user sets
    too. Everything refused is listed in one message, before anything runs."""
    policy = CodePolicy.of(user)
    targets = {path: t for path, t in targets_in(saved).items() if not (policy.any_target or t in policy.named)}
    remote = [path for path in remote_code_in(saved) if path not in remote_code_in(user) and not policy.any_target]
    trust = saved.get("trust_code", False)
    named = [f"{path}={t}" for path, t in targets.items()] + [f"{path}=true" for path in remote]
    if trust not in (False, user.get("trust_code", False)):  # the saved leave itself is the file's word
        named.append(f"trust_code={trust}".replace("'", "").replace(" ", ""))
    if not named:
        return
    raise KdclError(
        f"{where} names code to run ({', '.join(named)}): a run folder is code, and kdcl runs "
        "the code a file names only when you name it yourself; nothing was run",
        fix="if you trust that folder, repeat those keys on the command line ("
        + " ".join(named)
        + ") or add trust_code=true; otherwise start a new run",
    )


# How to allow a model's remote code (the messages name the teacher's key; student.… likewise).
REMOTE_CODE_OPT_IN = (
    "read that code first; if you trust it, add teacher.trust_remote_code=true (or "
    "student.trust_remote_code=true) to the command; or use a model transformers defines itself"
)


@contextlib.contextmanager
def remote_code_refused(label: str, fix: str = REMOTE_CODE_OPT_IN) -> Iterator[None]:
    """Turn transformers' refusal of a repository's own Python (``trust_remote_code=False``
    and an ``auto_map``) into one :class:`KdclError` about ``label``, with ``fix``."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise KdclError(
            f"{label} ships its own Python code (auto_map), which kdcl does not run unless you allow it; "
            "nothing of it was run",
            fix=fix,
        ) from None
