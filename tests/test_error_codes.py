"""Every error code shardkit raises or reports is in shardkit.errors.CATALOGUE, and the README's table is its output.

The scan reads the source with ast, so it sees codes on paths no test reaches: ``code="..."`` keyword arguments
(every string in the expression, so ``code="a" if x else "b"`` counts both), class-level and local ``code = "..."``
assignments, and code-shaped string arguments of calls that pass a ``report`` (``report.add("nan-values", ...)``).
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from codes_table import BEGIN, END, rewrite  # noqa: E402

from shardkit.errors import CATALOGUE, REPORTED_CATEGORIES, codes_table  # noqa: E402
from shardkit.validation.report import CODES  # noqa: E402

CODE_SHAPE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

HOW_TO_ADD = (
    "add one line per code to CATALOGUE in shardkit/errors.py, e.g.\n"
    '    "my-new-code": _e("<category>", "<one-line meaning>"),   # _w(...) for a validate warning\n'
    "(categories: index, file, layout, deep, model are validate findings; target, hub, usage, output, load are\n"
    "raised only), then run `python scripts/codes_table.py --write` to refresh README.md's codes table."
)


def _strings(node: ast.AST) -> list[ast.Constant]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _passes_report(call: ast.Call) -> bool:
    func = call.func
    receiver = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "report"
    return receiver or any(isinstance(arg, ast.Name) and arg.id == "report" for arg in call.args)


def codes_in_source() -> dict[str, list[str]]:
    """``{code: ["shardkit/x.py:12", ...]}`` for every code the package raises or reports."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "shardkit").rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=where)):
            hits: list[ast.Constant] = []
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "code":
                        hits += _strings(keyword.value)
                if _passes_report(node):
                    hits += [a for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "code" for t in targets) and node.value is not None:
                    hits += _strings(node.value)
            for hit in hits:
                if CODE_SHAPE.match(hit.value):
                    found.setdefault(hit.value, []).append(f"{where}:{hit.lineno}")
    return found


def test_the_scan_sees_the_known_ways_of_raising_a_code():
    found = codes_in_source()
    # keyword, class attribute, local assignment, report.add, a helper that is passed the report
    for code in ("sf-header-too-large", "unsafe-pickle", "sf-trailing-bytes", "nan-values", "duplicate-tensor"):
        assert code in found, code


def test_every_raised_or_reported_code_is_catalogued():
    missing = {code: places for code, places in codes_in_source().items() if code not in CATALOGUE}
    listing = "\n".join(f"  {code!r} at {', '.join(places[:3])}" for code, places in sorted(missing.items()))
    assert not missing, f"error codes missing from the catalogue:\n{listing}\n{HOW_TO_ADD}"


def test_every_catalogued_code_is_used():
    found = codes_in_source()
    # Codes that only ever travel through a variable are still named as a string somewhere in the package.
    source = "\n".join(p.read_text() for p in (ROOT / "shardkit").rglob("*.py") if p.name != "errors.py")
    stale = [code for code in CATALOGUE if code not in found and f'"{code}"' not in source]
    assert not stale, f"catalogued codes that nothing raises or reports: {stale}; remove them from shardkit/errors.py"


def test_catalogue_entries_are_well_formed():
    for code, info in CATALOGUE.items():
        assert CODE_SHAPE.match(code), code
        assert info.severity in ("error", "warning"), code
        assert info.meaning.endswith(".") and "\n" not in info.meaning and "|" not in info.meaning, code
        if info.category not in REPORTED_CATEGORIES:
            assert info.severity == "error", f"{code}: a raised-only code is an error"


def test_validate_codes_are_the_catalogues_findings():
    assert CODES == {c: (i.severity, i.meaning) for c, i in CATALOGUE.items() if i.category in REPORTED_CATEGORIES}


def test_readme_table_is_generated_from_the_catalogue():
    readme = (ROOT / "README.md").read_text()
    assert BEGIN in readme and END in readme
    assert rewrite(readme) == readme, "README.md's codes table is stale: run `python scripts/codes_table.py --write`"
    assert codes_table().count("\n") == len(CATALOGUE) + 2
