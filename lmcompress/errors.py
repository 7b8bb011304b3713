"""The one exception type lmcompress raises for bad input; the CLI prints its message and exits 2."""

from __future__ import annotations

import re
from collections.abc import Mapping


def _word(name: str) -> re.Pattern:
    """``name`` as a word of its own: not part of an identifier, a flag, a quoted string, a path or a package's
    extra (``".[harness]"``)."""
    return re.compile(rf"(?<![\w\-/\\.'\"\[]){re.escape(name)}(?![\w\-/\\'\"\]]|\.\w)")


class UserError(ValueError):
    """Bad input from the user: the message names the problem and what to do about it.

    ``param`` names the parameter(s) at fault as the Python API spells them (``"group_size"``, or a tuple of
    names). Every occurrence of such a name in the message is a reference to that parameter, so a front end
    can spell it its own way: :meth:`renamed` turns ``group_size`` into ``--group-size`` for the CLI.
    """

    def __init__(self, message: str, *, param: str | tuple[str, ...] | None = None) -> None:
        super().__init__(message)
        self.params: tuple[str, ...] = (param,) if isinstance(param, str) else tuple(param or ())

    @property
    def param(self) -> str | None:
        """The first parameter named, or None."""
        return self.params[0] if self.params else None

    def renamed(self, names: Mapping[str, str]) -> UserError:
        """The same error with each of its parameters spelled as ``names`` says (those it lacks stay as they are)."""
        message = str(self)
        for param in self.params:
            if param in names:
                message = _word(param).sub(names[param].replace("\\", "\\\\"), message)
        return UserError(message, param=self.params)
