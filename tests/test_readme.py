"""The README's two set-up commands and .ci/run stay in step."""

from pathlib import Path

ROOT = Path(__file__).parents[1]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.strip().splitlines()]


def test_readme_has_exactly_two_setup_commands():
    demo, tests = setup_commands()
    assert demo.endswith("python scripts/demo.py")
    assert tests.endswith("python -m pytest")
    # They come before any other section of the README.
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < text.index("## The demo")


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci


def test_module_map_matches_the_tree():
    """README's module map lists every module of shardkit (package ``__init__``/``__main__`` aside), and only those."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- modules:begin -->", 1)[1].split("<!-- modules:end -->", 1)[0]
    listed = [line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith("```")]
    tree = {
        p.relative_to(ROOT / "shardkit").as_posix()
        for p in (ROOT / "shardkit").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    missing = sorted(tree - set(listed))
    gone = sorted(set(listed) - tree)
    assert not missing and not gone and len(listed) == len(set(listed)), (
        f"README.md's module map is out of date: add {missing} (one line each: path, then what it does), remove {gone}"
    )
