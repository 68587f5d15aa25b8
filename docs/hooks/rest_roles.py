"""Griffe extension: the reST roles of the docstrings (``:func:`~rlhf_lightning.algorithms.ops.masked_mean```) as
Markdown for mkdocstrings.

A role whose target is an object of ``rlhf_lightning`` (by its full path, or a name seen from the object's class or
module) becomes a cross-reference (``[`masked_mean`][rlhf_lightning.algorithms.ops.masked_mean]``); any other (a
torch or Lightning name) becomes plain code. ``~`` shows the last part only, as in Sphinx.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`(~?)([\w.]+)(?:\(\))?`")


def _find(package: griffe.Module, path: str):
    if path == package.path:
        return package
    if not path.startswith(package.path + "."):
        return None
    try:
        obj = package[path[len(package.path) + 1:]]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    if obj.is_alias:
        try:
            return obj.final_target
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    return obj


def _rendered(obj) -> bool:
    """Whether the API pages show ``obj``: an object of the package, public, with a docstring (mkdocstrings'
    defaults leave out private names and undocumented objects)."""
    path = obj.path
    if not path.startswith("rlhf_lightning"):
        return False
    if any(part.startswith("_") and not part.startswith("__") for part in path.split(".")):
        return False
    return obj.is_module or obj.docstring is not None


def _resolve(package: griffe.Module, scope: griffe.Object, target: str):
    """The object a role names: a full path, or a name relative to the scope's class or module (or their parents);
    ``None`` unless the API pages show it."""
    candidates = [target]
    holder = scope
    while holder is not None:
        candidates.append(f"{holder.path}.{target}")
        holder = holder.parent
    for path in candidates:
        found = _find(package, path)
        if found is not None:
            return found if _rendered(found) else None
    return None


class RestRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        stack = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is not None:
                obj.docstring.value = self._convert(pkg, obj, obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)

    def _convert(self, package: griffe.Module, scope: griffe.Object, text: str) -> str:
        def replace(match: re.Match) -> str:
            short, target = match.group(1), match.group(2)
            shown = target.rsplit(".", 1)[-1] if short else target
            found = _resolve(package, scope if scope.is_class or scope.is_module else scope.parent, target)
            if found is None:
                return f"`{shown}`"
            return f"[`{shown}`][{found.path}]"

        return ROLE.sub(replace, text)
