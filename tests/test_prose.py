"""The repo's text speaks of the project as it is: no issue numbers, work sessions or rounds, no history
of how the code came to be, and no absolute paths of the machines it was built on, in code, comments,
docstrings, test names, docs or the README (a date belongs beside a measurement only)."""
import re
from pathlib import Path
import subprocess

import pytest

from conftest import ROOT

# What a text says of how it was made rather than of what the project is.
HISTORY = {
    "an issue number": r"\bissues? #?\d+",
    "a work session": r"(?<!scope=\")\bsessions?\b",
    "a round of work": r"\b(this|that|last|next|previous|earlier|later|each|every|one) rounds?\b|\brounds of\b",
    "a refactor told": r"\b(before|after) the (refactor|rewrite|move|split)\b",
    "what no longer is": r"\bno longer\b|\bused to\b|\bpreviously\b|\banymore\b|\bformerly\b",
    "what was added when": r"\b(was|were) (added|introduced|removed|renamed)\b|\badded (in|by) (this|the last)\b",
    "an old version": r"\bthe (old|previous|earlier) (code|version|layout|implementation|bench\.py|format)\b",
    "a build machine's path": r"(?<![\w.])/(work|root)/|/tmp/pytest",
}
TEXT_SUFFIXES = {".py", ".md", ".sh", ".txt", ".html", ".cfg", ".toml"}


def tracked_text_files():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout (an unpacked archive): every file below the root
        paths = [p.relative_to(ROOT) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    else:
        paths = [Path(line) for line in listed.stdout.splitlines()]
    this = Path(__file__).resolve().relative_to(ROOT)
    return sorted(p for p in paths if p.suffix in TEXT_SUFFIXES and p != this and (ROOT / p).is_file())


@pytest.mark.parametrize("what", HISTORY)
def test_no_text_tells_how_the_project_was_made(what):
    pattern = re.compile(HISTORY[what], re.IGNORECASE)
    found = [f"{path}:{number}: {line.strip()[:120]}"
             for path in tracked_text_files()
             for number, line in enumerate((ROOT / path).read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if pattern.search(line)]
    assert not found, f"{len(found)} lines with {what}:\n" + "\n".join(found[:40])


def test_the_patterns_find_what_they_name():
    """Each pattern catches the phrase it is for, so an empty result above means something."""
    samples = {"an issue number": "as issue 16 asked", "a work session": "measured this session",
               "a round of work": "added in this round", "a refactor told": "slower before the refactor",
               "what no longer is": "it no longer reads /proc", "what was added when": "the flag was added",
               "an old version": "the old code did it per row", "a build machine's path": "see /work/fashion/ckpt.pt"}
    assert set(samples) == set(HISTORY)
    for what, text in samples.items():
        assert re.search(HISTORY[what], text, re.IGNORECASE), what
