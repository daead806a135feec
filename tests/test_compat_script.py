"""scripts/compat_accelerate.py's own logic: which imports it re-points and which tests it counts (no network)."""

from __future__ import annotations

import importlib.util
import os
import sys
import tarfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def compat():
    spec = importlib.util.spec_from_file_location(
        "compat_accelerate", os.path.join(HERE, "..", "scripts", "compat_accelerate.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


SOURCE = '''import torch
from accelerate.big_modeling import (
    cpu_offload,
    cpu_offload_with_hook,
    init_empty_weights as iew,
)
from accelerate.test_utils import slow


def build():
    with iew():
        return torch.nn.Linear(2, 2)


class Tester:
    def helper(self):
        return build()

    def test_uses_helper(self):
        self.helper()

    def test_direct(self):
        from accelerate import cpu_offload

        cpu_offload(None)

    def test_unrelated(self):
        cpu_offload_with_hook(None)
'''


def test_rewrite_repoints_only_provided_names_and_keeps_line_numbers(compat):
    text, names = compat.rewrite(SOURCE, {"cpu_offload", "init_empty_weights", "dispatch_model"})
    assert names == {"cpu_offload", "iew"}
    lines = text.splitlines()
    assert len(lines) == len(SOURCE.splitlines())
    assert lines[1] == (
        "from accelerate.big_modeling import cpu_offload_with_hook; "
        "from shardkit.bigmodel import cpu_offload, init_empty_weights as iew"
    )
    assert lines[2:6] == ["", "", "", ""]
    assert "        from shardkit.bigmodel import cpu_offload" in lines
    assert "from accelerate.test_utils import slow" in lines
    compile(text, "rewritten", "exec")


def test_tests_touching_names_directly_or_through_helpers(compat):
    assert compat.touching_tests(SOURCE, {"cpu_offload", "iew"}) == {"test_uses_helper", "test_direct"}


def test_sources_from_an_sdist_or_a_folder(compat, tmp_path):
    root = tmp_path / "accelerate-9.9.9"
    (root / "tests").mkdir(parents=True)
    (root / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: accelerate\nVersion: 9.9.9\n")
    for name in compat.TEST_FILES:
        (root / "tests" / name).write_text(f"# {name}\n")
    archive = tmp_path / "accelerate-9.9.9.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="accelerate-9.9.9")
    for source, out in ((archive, "a"), (tmp_path, "b"), (root, "c")):
        folder, version = compat.extract_tests(str(source), str(tmp_path / out))
        assert version == "9.9.9" and sorted(os.listdir(folder)) == sorted(compat.TEST_FILES)


def test_a_parameterized_test_counts_under_its_function(compat):
    known = {"test_load_unexpected_keys"}
    assert compat.base_name("test_load_unexpected_keys_1", known) == "test_load_unexpected_keys"
    assert compat.base_name("test_other_0", known) is None
