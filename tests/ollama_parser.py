"""Ollama's Modelfile parser (ollama/ollama parser/parser.go, ParseFile), ported rune for rune, so the
tests read what ggtrain writes the way `ollama create` reads it. Importable as a plain module.

The grammar, as that state machine has it: an instruction is a keyword (letters; case-insensitive;
one of COMMANDS) then whitespace then its argument, which runs to the end of the line; an argument
that opens with " or \"\"\" runs on, across lines, until the buffer (trimmed) ends with the matching
quote, and is unquoted with no escape processing. PARAMETER takes a name ([A-Za-z0-9_]+) and then
the value; MESSAGE a role (system, user, assistant) and then the text. # in place of a keyword
starts a comment to the end of the line. Runes that are not printable are dropped (a tab inside an
argument is kept). The file must have a FROM.

    parse(text) -> [(name, args), ...]   name: "model" for FROM, the parameter's name for PARAMETER,
                                         else the keyword lowercased; MESSAGE args "role: text"
    raises ParseError (the Go error's text) for what ollama refuses
"""

from __future__ import annotations

COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires")
ROLES = ("system", "user", "assistant")
NIL, NAME, VALUE, PARAMETER, MESSAGE, COMMENT = range(6)


class ParseError(ValueError):
    pass


def _space(r: str) -> bool:
    return r in " \t"


def _newline(r: str) -> bool:
    return r in "\r\n"


def _alpha(r: str) -> bool:
    return "a" <= r <= "z" or "A" <= r <= "Z"


def _rune_for_state(r: str, cs: int) -> tuple[int, str]:
    """parseRuneForState: (next state, the rune to keep or '' for none)."""
    if cs == NIL:
        if r == "#":
            return COMMENT, ""
        if _space(r) or _newline(r):
            return NIL, ""
        return NAME, r
    if cs == NAME:
        if _alpha(r):
            return NAME, r
        if _space(r):
            return VALUE, ""
        raise ParseError("command must be one of " + ", ".join(COMMANDS))
    if cs == VALUE:
        if _newline(r) or _space(r):
            return NIL, r
        return VALUE, r
    if cs == PARAMETER:
        if _alpha(r) or r.isdigit() and r.isascii() or r == "_":
            return PARAMETER, r
        if _space(r):
            return VALUE, ""
        raise ParseError("unexpected EOF")
    if cs == MESSAGE:
        if _alpha(r):
            return MESSAGE, r
        if _space(r):
            return VALUE, ""
        raise ParseError("unexpected EOF")
    if cs == COMMENT:
        return (NIL, "") if _newline(r) else (COMMENT, "")
    raise AssertionError(cs)


def unquote(s: str) -> tuple[str, bool]:
    if s[:3] == '"""':
        if len(s) >= 6 and s[-3:] == '"""':
            return s[3:-3], True
        return "", False
    if s[:1] == '"':
        if len(s) >= 2 and s[-1] == '"':
            return s[1:-1], True
        return "", False
    return s, True


def parse(text: str) -> list[tuple[str, str]]:
    commands: list[tuple[str, str]] = []
    curr, buf, name, role = NIL, "", "", ""
    for r in text.removeprefix("\ufeff"):
        nxt, r = _rune_for_state(r, curr)
        if nxt != curr:
            if curr == NAME:
                if buf.lower() not in COMMANDS:
                    raise ParseError("command must be one of " + ", ".join(COMMANDS))
                low = buf.lower()
                if low == "from":
                    name = "model"
                elif low == "parameter":
                    nxt = PARAMETER
                else:
                    if low == "message":
                        nxt = MESSAGE
                    name = low
            elif curr == PARAMETER:
                name = buf
            elif curr == MESSAGE:
                if buf not in ROLES:
                    raise ParseError('message role must be one of "system", "user", or "assistant"')
                role = buf
            elif curr == VALUE:
                s, ok = unquote(buf.strip())
                if not ok or _space(r):
                    buf += r
                    continue
                if role:
                    s, role = f"{role}: {s}", ""
                commands.append((name, s))
            buf, curr = "", nxt
        if r and r.isprintable():
            buf += r
    if curr == VALUE:
        s, ok = unquote(buf.strip())
        if not ok:
            raise ParseError("unexpected EOF")
        commands.append((name, f"{role}: {s}" if role else s))
    elif curr not in (NIL, COMMENT):
        raise ParseError("unexpected EOF")
    if not any(n == "model" for n, _ in commands):
        raise ParseError("no FROM line")
    return commands
