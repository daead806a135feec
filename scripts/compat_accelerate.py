"""Run accelerate's own big-model tests against accelerate and against shardkit, and compare, test by test.

accelerate's source package is fetched when the script runs (``pip download --no-binary :all: --no-deps
accelerate==X``, X defaulting to the installed accelerate) or taken from ``--source`` (an sdist or an unpacked
folder; for machines without network). Nothing of accelerate's is kept in this repository.

Only the imports of the names shardkit provides (``shardkit.bigmodel.__all__``) are re-pointed; everything else
the tests import (test utilities, the hook classes shardkit does not have) still comes from accelerate. Both runs
use the installed accelerate for those. Each run is a pytest subprocess writing a JUnit XML report; the script
prints one line per test that touches a re-pointed name (directly or through a helper it calls), then totals.

A test that passes with accelerate and fails with shardkit is either listed in :data:`DELIBERATE` below, with the
reason a user would accept (the README's "What differs from accelerate" table says the same), or it is a bug:
the exit code is 1 while any such test remains.

    python scripts/compat_accelerate.py                          # fetch the installed accelerate's sdist
    python scripts/compat_accelerate.py --source .whl/accelerate-1.15.0.tar.gz --json
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_FILES = ("test_big_modeling.py", "test_modeling_utils.py", "test_offload.py")

#: Tests that pass with accelerate and fail with shardkit on purpose: ``"file::test"`` -> the reason.
#: Keep this short; every entry is mirrored in the README's "What differs from accelerate" table.
_RESERVE = (
    "room for streaming offloaded blocks is held only when something is offloaded, sized to what the dispatcher uses "
    "(staging slabs on the main device), not one largest layer on GPU 0 and the CPU always; these maps are for "
    "budgets of a few hundred bytes (match_accelerate=True gives accelerate's map)"
)
_HOST_AT_REST = (
    "CPU-tier weights stay real host tensors between forwards (pinned when a GPU runs them; on a CPU execution "
    "device nothing is streamed at all), so state_dict() and .device tell the truth, instead of meta tensors "
    "whose values hide in the hook's weights_map"
)
_BLOCK_HOOKS = (
    "one hook per block: the submodules of an offloaded block have no _hf_hook of their own, and tied weights "
    "are staged once per slab, so there is no tied_params_map to inspect (the test's memory and output checks, "
    "which run first, pass)"
)
DELIBERATE: dict[str, str] = {
    "test_modeling_utils.py::test_infer_auto_device_map": _RESERVE,
    "test_modeling_utils.py::test_infer_auto_device_map_with_tied_weights": _RESERVE,
    "test_modeling_utils.py::test_infer_auto_device_map_tied_weights_partner_module_split": _RESERVE,
    "test_modeling_utils.py::test_infer_auto_device_map_with_buffer_check": _RESERVE,
    "test_modeling_utils.py::test_infer_auto_device_map_with_buffer_check_and_multi_devices": _RESERVE,
    "test_modeling_utils.py::test_infer_auto_device_map_with_fallback_allocation": _RESERVE,
    "test_modeling_utils.py::test_infer_auto_device_map_with_fallback_allocation_and_buffers": _RESERVE,
    "test_modeling_utils.py::test_infer_auto_device_map_with_fallback_allocation_partial_fit": _RESERVE,
    "test_modeling_utils.py::test_load_checkpoint_in_model_all_disk_safetensors": (
        "the disk tier reads the checkpoint's own safetensors file where it can, instead of writing a .dat copy of every weight"
    ),
    "test_modeling_utils.py::test_align_module_device_offloaded": _HOST_AT_REST,
    # GPU-only tests
    "test_big_modeling.py::test_load_checkpoint_and_dispatch": _HOST_AT_REST,
    "test_big_modeling.py::test_load_checkpoint_and_dispatch_with_unused_submodules": _HOST_AT_REST,
    "test_big_modeling.py::test_dispatch_model_tied_weights_memory_with_nested_offload_cpu": _BLOCK_HOOKS,
}

# parameterized is a test-only dependency of accelerate's suite that a bare machine may lack; this stand-in
# implements the one form the big-model tests use (``@parameterized.expand([(args,), ...])`` in a class body)
# with parameterized's default test names.
PARAMETERIZED_SHIM = '''
import re
import sys


class parameterized:
    @staticmethod
    def expand(params):
        def decorate(func):
            namespace = sys._getframe(1).f_locals
            for index, args in enumerate(params):
                args = args if isinstance(args, tuple) else (args,)
                name = f"{func.__name__}_{index}"
                if args and isinstance(args[0], str):
                    name += "_" + re.sub("[^a-zA-Z0-9_]+", "_", args[0])

                def test(self, _args=args):
                    return func(self, *_args)

                test.__name__ = name
                namespace[name] = test
            return None

        return decorate
'''


@dataclass
class Outcome:
    """One test's result in one run: ``passed``, ``failed``, ``skipped`` or ``missing`` (not collected)."""

    status: str
    message: str = ""


@dataclass
class Row:
    file: str
    test: str
    accelerate: Outcome
    shardkit: Outcome
    verdict: str  # "same", "fixed" (fails with accelerate, passes with shardkit), "deliberate", "bug"
    reason: str = ""


# -- source ------------------------------------------------------------------------------------------------------


def fetch_sdist(version: str, into: str) -> str:
    """Download accelerate's source package for ``version`` with pip; the path of the archive."""
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    command += ["-d", into, f"accelerate=={version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    found = [f for f in os.listdir(into) if f.startswith("accelerate-") and f.endswith((".tar.gz", ".zip"))]
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        sys.exit(f"compat_accelerate: pip download of accelerate=={version} failed: {tail[0]} (use --source PATH)")
    return os.path.join(into, found[0])


def extract_tests(source: str, into: str) -> tuple[str, str | None]:
    """Copy the test files out of an sdist or an unpacked source folder into ``into``; (folder, sdist version)."""
    os.makedirs(into, exist_ok=True)
    version = None
    if os.path.isdir(source):
        candidates = [os.path.join(source, "tests")] + [
            os.path.join(source, d, "tests") for d in sorted(os.listdir(source)) if os.path.isdir(os.path.join(source, d))
        ]
        folder = next((c for c in candidates if os.path.isfile(os.path.join(c, TEST_FILES[0]))), None)
        if folder is None:
            sys.exit(f"compat_accelerate: {source}: no tests/{TEST_FILES[0]} in it (an unpacked accelerate sdist?)")
        for name in TEST_FILES:
            shutil.copy(os.path.join(folder, name), os.path.join(into, name))
        info = os.path.join(os.path.dirname(folder), "PKG-INFO")
        if os.path.isfile(info):
            version = _pkg_version(open(info, encoding="utf-8").read())
        return into, version
    if not tarfile.is_tarfile(source):
        sys.exit(f"compat_accelerate: {source}: not a folder or a .tar.gz source package")
    with tarfile.open(source) as archive:
        members = {}
        for member in archive.getmembers():
            parts = member.name.split("/")
            if len(parts) == 3 and parts[1] == "tests" and parts[2] in TEST_FILES and member.isfile():
                members[parts[2]] = member
            elif len(parts) == 2 and parts[1] == "PKG-INFO" and member.isfile():
                version = _pkg_version(archive.extractfile(member).read().decode("utf-8", "replace"))
        missing = [n for n in TEST_FILES if n not in members]
        if missing:
            sys.exit(f"compat_accelerate: {source}: no tests/{missing[0]} in this archive")
        for name, member in members.items():
            with open(os.path.join(into, name), "wb") as out:
                out.write(archive.extractfile(member).read())
    return into, version


def _pkg_version(text: str) -> str | None:
    match = re.search(r"^Version:\s*(\S+)", text, re.MULTILINE)
    return match.group(1) if match else None


# -- rewriting and analysis --------------------------------------------------------------------------------------


def shardkit_names() -> set[str]:
    sys.path.insert(0, REPO)
    import shardkit.bigmodel  # lazy: imports no torch

    return set(shardkit.bigmodel.__all__)


def rewrite(text: str, provided: set[str]) -> tuple[str, set[str]]:
    """``text`` with every ``from accelerate... import name`` of a provided name importing it from shardkit.bigmodel.

    Other names of the same statement keep their accelerate import; line numbers are kept (padded with blank
    lines), so tracebacks point at the same lines in both runs. Returns the new text and the names re-pointed.
    """
    lines = text.splitlines(keepends=True)
    repointed: set[str] = set()
    edits = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").split(".")[0] == "accelerate" or node.level:
            continue
        ours = [a for a in node.names if a.name in provided]
        if not ours:
            continue
        theirs = [a for a in node.names if a.name not in provided]
        spell = lambda a: a.name if a.asname is None else f"{a.name} as {a.asname}"  # noqa: E731
        statements = []
        if theirs:
            statements.append(f"from {node.module} import {', '.join(map(spell, theirs))}")
        statements.append(f"from shardkit.bigmodel import {', '.join(map(spell, ours))}")
        repointed.update(a.asname or a.name for a in ours)
        edits.append((node.lineno, node.end_lineno, node.col_offset, "; ".join(statements)))
    for start, end, col, statement in sorted(edits, reverse=True):
        indent = lines[start - 1][:col]
        lines[start - 1 : end] = [f"{indent}{statement}\n"] + ["\n"] * (end - start)
    return "".join(lines), repointed


def touching_tests(text: str, names: set[str]) -> set[str]:
    """Test functions that use one of ``names``, directly or through module functions, classes or ``self.`` helpers."""
    tree = ast.parse(text)
    uses: dict[str, set[str]] = {}  # function key -> names it references
    calls: dict[str, set[str]] = {}  # function key -> function keys it may call
    module_level = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    tests: dict[str, str] = {}

    def scan(key: str, node: ast.AST, klass: str | None) -> None:
        found, called = set(), set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                found.add(sub.id)
                if sub.id in module_level:
                    called.add(sub.id)
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and klass is not None:
                if sub.value.id in ("self", "cls"):
                    called.add(f"{klass}.{sub.attr}")
        uses[key], calls[key] = found, called

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            scan(node.name, node, None)
            if node.name.startswith("test"):
                tests[node.name] = node.name
        elif isinstance(node, ast.ClassDef):
            scan(node.name, node, node.name)  # a class used as a whole (models built in tests)
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    key = f"{node.name}.{item.name}"
                    scan(key, item, node.name)
                    if item.name.startswith("test"):
                        tests[key] = item.name

    def reaches(key: str, seen: set[str]) -> bool:
        if key in seen or key not in uses:
            return False
        seen.add(key)
        return bool(uses[key] & names) or any(reaches(k, seen) for k in calls[key])

    return {test for key, test in tests.items() if reaches(key, set())}


# -- running -----------------------------------------------------------------------------------------------------


def prepare(folder: str, texts: dict[str, str]) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, text in texts.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as out:
            out.write(text)
    try:
        import parameterized  # noqa: F401
    except ImportError:
        with open(os.path.join(folder, "parameterized.py"), "w", encoding="utf-8") as out:
            out.write(PARAMETERIZED_SHIM)


def start(folder: str, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, folder, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONHASHSEED", "0")
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN", "--tb=line"]
    command += ["-o", "junit_family=xunit1", "--junit-xml", os.path.join(folder, "report.xml"), "-o", "addopts="]
    command += [*extra, *TEST_FILES]
    log = open(os.path.join(folder, "pytest.log"), "w")
    return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def results(folder: str) -> dict[tuple[str, str], Outcome]:
    """``{(file, test name): Outcome}`` from the run's JUnit report."""
    path = os.path.join(folder, "report.xml")
    if not os.path.isfile(path):
        log = open(os.path.join(folder, "pytest.log"), encoding="utf-8", errors="replace").read()
        sys.exit(f"compat_accelerate: pytest wrote no report in {folder}:\n{log[-3000:]}")
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        # the class path names the test module (``file`` may name the module that defined a generated test)
        classname = case.get("classname") or ""
        file = classname.split(".")[0] + ".py" if classname else case.get("file", "")
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = "skipped" if child.tag == "skipped" else "failed"
                message = child.get("message") or (child.text or "")
                break
        message = next((line.strip() for line in message.splitlines() if line.strip()), "")
        out[(os.path.basename(file), case.get("name"))] = Outcome(status, message[:200])
    return out


def base_name(test: str, known: set[str]) -> str | None:
    """The function a collected test comes from (``test_x_1`` -> ``test_x`` for parameterized tests)."""
    probe = test
    while probe:
        if probe in known:
            return probe
        probe = probe.rsplit("_", 1)[0] if "_" in probe else ""
    return None


def compare(acc: dict, ours: dict, touching: dict[str, set[str]]) -> list[Row]:
    rows = []
    for file, test in sorted(set(acc) | set(ours)):
        if base_name(test, touching.get(file, set())) is None:
            continue
        a = acc.get((file, test), Outcome("missing"))
        s = ours.get((file, test), Outcome("missing"))
        key = f"{file}::{test}"
        if a.status == "passed" and s.status != "passed":
            verdict, reason = ("deliberate", DELIBERATE[key]) if key in DELIBERATE else ("bug", s.message)
        elif a.status != "passed" and s.status == "passed":
            verdict, reason = "fixed", a.message
        else:
            verdict, reason = "same", (s.message if s.status != "passed" else "")
            if key in DELIBERATE and s.status == "passed":
                reason = "listed as deliberate but passes: remove it from DELIBERATE"
        rows.append(Row(file, test, a, s, verdict, reason))
    return rows


def totals(rows: list[Row]) -> dict[str, int]:
    count = lambda pred: sum(1 for r in rows if pred(r))  # noqa: E731
    return {
        "tests": len(rows),
        "pass_accelerate": count(lambda r: r.accelerate.status == "passed"),
        "pass_shardkit": count(lambda r: r.shardkit.status == "passed"),
        "pass_both": count(lambda r: r.accelerate.status == r.shardkit.status == "passed"),
        "skipped_accelerate": count(lambda r: r.accelerate.status == "skipped"),
        "deliberate": count(lambda r: r.verdict == "deliberate"),
        "bugs": count(lambda r: r.verdict == "bug"),
        "only_shardkit": count(lambda r: r.verdict == "fixed"),
    }


def print_table(rows: list[Row], counts: dict[str, int], versions: dict) -> None:
    mark = {"passed": "pass", "failed": "FAIL", "skipped": "skip", "missing": "----"}
    width = max((len(r.test) for r in rows), default=10)
    print(f"accelerate tests {versions['tests']} | installed accelerate {versions['accelerate']} | torch {versions['torch']}")
    print(f"{'test':{width}}  accel  shardkit  note")
    for r in rows:
        note = {"deliberate": "deliberate: ", "bug": "BUG: ", "fixed": "accelerate fails: "}.get(r.verdict, "")
        print(f"{r.test:{width}}  {mark[r.accelerate.status]:5}  {mark[r.shardkit.status]:8}  {note}{r.reason}".rstrip())
    print(
        f"\n{counts['tests']} tests touch shardkit's names: {counts['pass_accelerate']} pass with accelerate "
        f"({counts['skipped_accelerate']} skipped), {counts['pass_shardkit']} with shardkit, {counts['pass_both']} with both; "
        f"{counts['deliberate']} deliberate differences, {counts['bugs']} undocumented failures, "
        f"{counts['only_shardkit']} pass only with shardkit"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="accelerate version to fetch (default: the installed one)")
    parser.add_argument("--source", help="an accelerate sdist (.tar.gz) or unpacked source folder, instead of pip download")
    parser.add_argument("--json", action="store_true", help="print the rows and totals as JSON")
    parser.add_argument("--keep", help="work in this folder and keep it (rewritten tests, pytest logs, reports)")
    parser.add_argument("--serial", action="store_true", help="run the two pytest runs one after the other")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, to run a subset")
    args = parser.parse_args(argv)

    installed = importlib.metadata.version("accelerate")
    work = args.keep or tempfile.mkdtemp(prefix="compat-accelerate-")
    began = time.monotonic()
    try:
        source = args.source
        if source is None:
            source = fetch_sdist(args.version or installed, os.path.join(work, "download"))
        folder, version = extract_tests(source, os.path.join(work, "original"))
        if version and version != installed:
            print(
                f"compat_accelerate: warning: tests of accelerate {version}, installed accelerate {installed}",
                file=sys.stderr,
            )
        provided = shardkit_names()
        originals = {n: open(os.path.join(folder, n), encoding="utf-8").read() for n in TEST_FILES}
        rewritten, touching, repointed = {}, {}, set()
        for name, text in originals.items():
            rewritten[name], names = rewrite(text, provided)
            repointed |= names
            touching[name] = touching_tests(text, names)
        prepare(os.path.join(work, "accelerate"), originals)
        prepare(os.path.join(work, "shardkit"), rewritten)
        extra = ["-k", args.keyword] if args.keyword else []
        runs = {}
        for which in ("accelerate", "shardkit"):
            runs[which] = start(os.path.join(work, which), extra)
            if args.serial:
                runs[which].wait()
        for proc in runs.values():
            proc.wait()
        acc, ours = results(os.path.join(work, "accelerate")), results(os.path.join(work, "shardkit"))
        rows = compare(acc, ours, touching)
        counts = totals(rows)
        import torch

        versions = {"tests": version or "?", "accelerate": installed, "torch": torch.__version__}
        if args.json:
            payload = {
                "versions": versions,
                "repointed": sorted(repointed),
                "totals": counts,
                "seconds": round(time.monotonic() - began, 1),
                "rows": [asdict(r) for r in rows],
            }
            print(json.dumps(payload, indent=2))
        else:
            print_table(rows, counts, versions)
            print(f"re-pointed: {', '.join(sorted(repointed))}; {time.monotonic() - began:.0f} s")
        return 1 if counts["bugs"] else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
