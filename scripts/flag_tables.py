"""The flag tables in docs/, generated from `vae`'s argument parser so that they cannot drift.

A page marks each table with ``<!-- flags: COMMAND -->`` ... ``<!-- /flags -->``; this script
rewrites what lies between. `python scripts/flag_tables.py` rewrites the pages,
`--check` exits 1 naming every table that differs from the parser (the test suite runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from vaeserve.cli import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"(<!-- flags: ([\w-]+) -->\n)(.*?)(<!-- /flags -->)", re.DOTALL)
# `vae serve`'s help ends "[env VAESERVE_X; default: D]"; other commands' "(default: D)".
ENV_HELP = re.compile(r"\s*\[env (\w+); default: (.*)\]$", re.DOTALL)
PLAIN_DEFAULT = re.compile(r"\s*\(default: ([^()]*)\)$")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def table(parser: argparse.ArgumentParser) -> str:
    """Markdown: one row per flag (the env column when the command reads variables)."""
    rows = [_row(action) for action in parser._actions if action.option_strings and action.dest != "help"]
    with_env = any(env for _, env, _, _ in rows)
    head = "| flag | variable | default | meaning |\n|---|---|---|---|\n"
    if not with_env:
        head = "| flag | default | meaning |\n|---|---|---|\n"
    lines = [
        f"| `{flag}` | `{env}` | {default} | {meaning} |"
        if with_env
        else f"| `{flag}` | {default} | {meaning} |"
        for flag, env, default, meaning in rows
    ]
    return head + "\n".join(lines) + "\n"


def _row(action: argparse.Action) -> tuple[str, str, str, str]:
    # The long spelling; a boolean's "--no-x" is implied by its "--x".
    longs = [s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-")]
    flag = (longs or action.option_strings)[0]
    meaning = " ".join((action.help or "").split())
    env, default = "", _default(action)
    found = ENV_HELP.search(meaning)
    if found:
        env, default = found.group(1), found.group(2)
        meaning = meaning[: found.start()]
    elif plain := PLAIN_DEFAULT.search(meaning):
        default, meaning = plain.group(1), meaning[: plain.start()]
    meaning = meaning.replace("|", "\\|")
    return flag, env, default, meaning


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default in (None, argparse.SUPPRESS):
        return "unset"
    if isinstance(action.default, list | tuple):
        return " ".join(str(v) for v in action.default)
    return str(action.default)


def render(text: str, commands: dict[str, argparse.ArgumentParser]) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name not in commands:
            raise SystemExit(f"flag_tables: no command `vae {name}` (marker in docs)")
        return match.group(1) + table(commands[name]) + match.group(4)

    return BLOCK.sub(replace, text)


def stale_pages(docs: Path = DOCS) -> list[str]:
    """Pages whose flag tables differ from the parser."""
    commands = subcommands()
    return [str(p) for p in sorted(docs.glob("*.md")) if render(p.read_text(), commands) != p.read_text()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report tables that differ; exit 1 if any")
    args = parser.parse_args()
    if args.check:
        stale = stale_pages()
        for page in stale:
            print(f"{page}: a flag table differs from the parser (run python scripts/flag_tables.py)")
        return 1 if stale else 0
    commands = subcommands()
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        if render(text, commands) != text:
            page.write_text(render(text, commands))
            print(f"rewrote the flag tables of {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
