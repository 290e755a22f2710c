"""Kubernetes' ``$(VAR)`` expansion of env values, command, args and ``subPathExpr``."""

from __future__ import annotations

from collections.abc import Mapping


def expand(text: str, values: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion, as in env values, command, args and ``subPathExpr``.

    ``$(NAME)`` becomes the value of NAME when it is defined and stays as written when it is
    not; ``$$`` is a literal ``$`` (so ``$$(NAME)`` gives ``$(NAME)``); any other ``$`` stays.
    Never raises: whatever a manifest says, it is expanded or kept.
    """
    out: list[str] = []
    index = 0
    end = len(text)
    while index < end:
        char = text[index]
        if char != "$" or index + 1 == end:
            out.append(char)
            index += 1
            continue
        following = text[index + 1]
        if following == "$":
            out.append("$")
            index += 2
        elif following == "(":
            close = text.find(")", index + 2)
            if close == -1:
                out.append("$(")
                index += 2
            else:
                name = text[index + 2 : close]
                out.append(values.get(name, f"$({name})"))
                index = close + 1
        else:
            out.append("$" + following)
            index += 2
    return "".join(out)
