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
