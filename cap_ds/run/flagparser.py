"""A strict command-line parser over dataclasses: every mistake is one line, and ``--help`` reads by topic.

argparse on its own accepts prefixes (``--learning_rat`` silently sets ``--learning_rate``), answers a typo with
the whole usage block, and ``HfArgumentParser`` turns an unknown flag into a ``ValueError`` traceback. Here an
unknown flag, a bad value or a bad choice raises ``error_type`` with one line naming the flag and the closest valid
ones (exit code 2 through ``train.cli``), and the help groups flags into sections without moving fields between
dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable
from typing import NoReturn

from transformers import HfArgumentParser

_ARGUMENT = re.compile(r"^argument (?P<flag>[^:/ ]+)(?:/[^: ]+)?: (?P<rest>.*)$", re.S)
_CHOICE = re.compile(r"invalid choice: (?P<value>.*?) \(choose from (?P<choices>.*)\)$", re.S)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--flag TYPE`` once (not the dash alias HfArgumentParser adds), the default when there is one, and the
    description as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=110)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.nargs == 0 or "default" in text.lower():
            return text
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flag = action.option_strings[0]
        if action.nargs == 0:
            return ", ".join(action.option_strings) if flag == "-h" else flag
        if action.choices is not None:
            return f"{flag} {{{','.join(map(str, action.choices))}}}"
        kind = getattr(action.type, "__name__", "")
        metavar = {"int": "N", "float": "X", "str": "STR", "string_to_bool": "[BOOL]"}.get(kind, "VALUE")
        return f"{flag} {metavar}"


class StrictArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` without prefix matching, raising ``error_type`` (one line) for every parse error.

    ``sections``: help section titles in display order; ``section_of(dtype, name)`` says which section a field
    goes to (a title from ``sections``)."""

    def __init__(self, dataclass_types: Iterable[type], *, error_type: type[Exception], sections: Iterable[str],
                 section_of: Callable[[type, str], str], description: str | None = None,
                 epilog: str | None = None) -> None:
        self._error_type = error_type
        self._section_of = section_of
        self._section_titles = list(sections)
        self._sections: dict[str, argparse._ArgumentGroup] = {}
        super().__init__(dataclass_types, allow_abbrev=False, formatter_class=_HelpFormatter,
                         description=description, epilog=epilog, usage="%(prog)s [--flag VALUE ...]")
        for action in self._actions:  # HfArgumentParser gives --no_X the help of --X
            if action.option_strings and action.option_strings[0] == f"--no_{action.dest}":
                action.help = f"Turn --{action.dest} off."

    # ---------------------------------------------------------------- help sections
    def _section(self, title: str) -> argparse._ArgumentGroup:
        if not self._sections:  # every section exists up front, so --help lists them in the given order
            for t in self._section_titles:
                self._sections[t] = self.add_argument_group(t)
        return self._sections[title]

    def _add_dataclass_arguments(self, dtype) -> None:
        from typing import get_type_hints

        hints = get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            f.type = hints[f.name]
            self._parse_dataclass_field(self._section(self._section_of(dtype, f.name)), f)

    # ---------------------------------------------------------------- one-line errors
    def error(self, message: str) -> NoReturn:
        # argparse's hook for every parse error (it would print the usage and exit 2)
        raise self._error_type(self._one_line(message))

    def _one_line(self, message: str) -> str:
        match = _ARGUMENT.match(message.strip())
        if match is None:
            return " ".join(message.split())
        flag, rest = match["flag"], " ".join(match["rest"].split())
        choice = _CHOICE.match(rest)
        if choice is not None:
            choices = [c.strip().strip("'\"") for c in choice["choices"].split(",")]
            value = choice["value"].strip("'\"")
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return f"{flag}: invalid choice {value!r}{hint}; allowed: {', '.join(choices)}"
        return f"{flag}: {rest}"

    def flags(self) -> list[str]:
        """Every long flag the parser knows (the underscore spelling first)."""
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def unknown(self, extra: list[str]) -> str:
        """The line for arguments no flag took: the first unknown flag and the closest valid ones."""
        unknown = [a for a in extra if a.startswith("-") and not _is_number(a)]
        if not unknown:
            return f"unexpected argument {extra[0]!r} (a value without a flag, or a flag given too many values)"
        flag = unknown[0].split("=", 1)[0]
        known = [f for f in self.flags() if "_" in f or "-" not in f[2:]]  # not the dash aliases
        close = difflib.get_close_matches(flag.replace("-", "_").lstrip("_"),
                                          [f[2:] for f in known], n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else \
            "; see --help for the flags"
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        return f"unknown flag {flag}{more}{hint}"

    def parse(self, argv: list[str] | None) -> tuple:
        """The dataclasses, or ``error_type`` for any argument left over."""
        *parsed, extra = self.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if extra:
            raise self._error_type(self.unknown(extra))
        return tuple(parsed)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
