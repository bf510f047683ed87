"""Every file that a comment, docstring or doc page names exists: a path like
`server/engine/pool.py` in any tracked text file resolves from the repo root, from the
package (src/piggyback_serve/), from the naming file's folder or from docs/."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "piggyback_serve"
TEXT = re.compile(r"\.(py|md|sh|ya?ml|toml|js|html|css|cfg)$|(^|/)Dockerfile$")
EXT = r"(?:py|md|sh|ya?ml|toml|js|html|css|json|safetensors|txt)"
# A relative path with at least one folder, not part of a URL, an absolute path or a variable.
NAMED = re.compile(r"(?<![\w./$~:-])((?:[\w.-]+/)+[\w.-]+\." + EXT + r")\b")


def tracked_text_files() -> list[str]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    this = str(Path(__file__).relative_to(ROOT))  # its own test names a file that is gone
    return [n for n in names if TEXT.search(n) and (ROOT / n).is_file() and n != this]


def dangling(name: str, root: Path = ROOT) -> list[str]:
    bases = (root, root / PACKAGE.relative_to(ROOT), (root / name).parent, root / "docs")
    found = []
    for number, line in enumerate((root / name).read_text(errors="replace").splitlines(), 1):
        for match in NAMED.finditer(line):
            path = match.group(1)
            if not any((base / path).exists() for base in bases):
                found.append(f"{name}:{number}: {path}")
    return found


def test_the_scan_finds_a_dangling_name(tmp_path):
    (tmp_path / "src" / "piggyback_serve" / "server").mkdir(parents=True)
    (tmp_path / "src" / "piggyback_serve" / "server" / "app.py").write_text("")
    (tmp_path / "a.py").write_text("# see server/engine/gone.py, server/app.py, http://x/y.py\n")
    assert dangling("a.py", tmp_path) == ["a.py:1: server/engine/gone.py"]


def test_every_named_file_exists():
    files = tracked_text_files()
    assert len(files) > 100
    assert [d for name in files for d in dangling(name)] == []
