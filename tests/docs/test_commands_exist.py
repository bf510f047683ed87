"""The README and the docs name only commands and flags that exist: every `piggy`,
`piggy-masks` and `piggy-serve` they show runs a real sub-command with real flags, and their
shell blocks run them from the README's venv (`.venv/bin/...`), as pasted after its set-up."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from piggyback_serve.client import cli as piggy
from piggyback_serve.masks import cli as piggy_masks
from piggyback_serve.server import cli as piggy_serve

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {
    "piggy": piggy.parser,
    "piggy-masks": piggy_masks.parser,
    "piggy-serve": piggy_serve.parser,
}
# A command, then its words up to the end of the line, a backtick, a pipe or a comment.
COMMAND = re.compile(
    r"(?:(?<=bin/)|(?<![\w/.-]))(piggy-masks|piggy-serve|piggy)(?=[ \t`\n)]|$)([^`\n|#;&)]*)"
)


def sub_commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def problems(name: str, words: list[str]) -> list[str]:
    """What is wrong with `name words...` as a command line (the words after the command)."""
    parser = PARSERS[name]()
    known, subs, found = options(parser), sub_commands(parser), []
    ends = next((i for i, w in enumerate(words) if w.endswith((",", "."))), len(words))
    words = iter([*words[:ends], *[w.rstrip(",.") for w in words[ends : ends + 1]]])
    for word in words:  # prose ends a command at a comma or full stop
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            if flag not in known:
                found.append(f"{name}: no option {flag}")
            elif known[flag].nargs != 0 and "=" not in word:
                next(words, None)  # its value
        elif subs and word in subs:
            known = {**known, **options(subs[word])}
            subs = {}
        elif subs and re.fullmatch(r"[a-z][a-z-]*", word):  # not NAME, x2, a path or a value
            found.append(f"{name}: no command {word}")
            subs = {}
    return found


def mentions(page: Path) -> list[tuple[str, list[str]]]:
    text = page.read_text().replace("\\\n", " ")
    return [(m[1], m[2].split()) for m in COMMAND.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_name_real_commands_and_flags(page: Path):
    found = [p for name, words in mentions(page) for p in problems(name, words)]
    assert not found, f"{page.name}: {found}"


def test_the_check_catches_what_does_not_exist():
    assert problems("piggy", ["retrain", "NAME", "FOLDER"]) == ["piggy: no command retrain"]
    assert problems("piggy-masks", ["train", "--data", "x", "--gpu"]) == [
        "piggy-masks: no option --gpu"
    ]
    assert problems("piggy", ["--json", "tasks"]) == []
    assert problems("piggy", ["health,", "piggy", "upload"]) == []  # prose: "piggy health, ..."
    assert problems("piggy-serve", ["--demo", "--ray", "--replicas", "2"]) == []


# A shell line that starts a project command (or pip, python -m, mkdocs) from the PATH, not
# from the venv the README's set-up makes; environment assignments may come first.
BARE = re.compile(
    r"^(?:\$ )?(?:[A-Z_]+=\S+ )*(piggy-masks|piggy-serve|piggy|pip|python -m|mkdocs)(?=\s|$)"
)


def bare_commands(page: Path) -> list[str]:
    text = page.read_text().replace("\\\n", " ")
    blocks = re.findall(r"^```(?:bash|sh|console)?\n(.*?)^```", text, re.M | re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if BARE.match(line.strip())]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_shell_blocks_run_commands_from_the_venv(page: Path):
    assert bare_commands(page) == [], page.name


def test_the_venv_check_catches_a_bare_command(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "```bash\n.venv/bin/piggy tasks\nPIGGY_URL=x piggy tasks\npip install .\ncurl x\n```\n"
    )
    assert bare_commands(page) == ["PIGGY_URL=x piggy tasks", "pip install ."]
