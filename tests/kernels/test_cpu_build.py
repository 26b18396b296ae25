"""Building, caching and loading the C kernels for CPU tensors, and the fallback when that fails."""

from __future__ import annotations

import ctypes
import stat
import subprocess
import threading
import warnings

import pytest
import torch
from effllm.kernels import _cpu_abi, backend_for, cpu_build

# These tests check building, not the kernels: compiling without optimisation takes a quarter of the time.
QUICK_FLAGS = tuple(flag for flag in cpu_build.FLAGS if not flag.startswith("-O")) + ("-O0",)


@pytest.fixture(autouse=True)
def quick_flags(monkeypatch):
    monkeypatch.setattr(cpu_build, "FLAGS", QUICK_FLAGS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build into a fresh cache folder, shared by the tests that only read it."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_build, "FLAGS", QUICK_FLAGS)
        return cache, cpu_build.build(cache_dir=cache)


@pytest.fixture
def fresh_library():
    """Clears the process-wide library cache around a test that changes how it is built."""
    cpu_build.library.cache_clear()
    yield
    cpu_build.library.cache_clear()


def test_build_writes_a_loadable_library_under_a_hash_folder(built):
    cache, path = built
    assert path.name == cpu_build.LIBRARY_NAME
    assert path.parent.parent == cache and len(path.parent.name) == 16
    library = cpu_build.load(path)
    for name, argtypes in _cpu_abi.SIGNATURES.items():
        assert getattr(library, name).argtypes == argtypes
    assert [p.name for p in path.parent.iterdir()] == [cpu_build.LIBRARY_NAME]  # no temporary left behind


def test_second_build_reuses_the_cache_without_compiling(built, monkeypatch):
    cache, path = built
    before = path.stat().st_mtime_ns
    real_run = subprocess.run

    def run_without_compiling(command, *args, **kwargs):
        assert "-o" not in command, "the cached library was compiled again"
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(cpu_build.subprocess, "run", run_without_compiling)
    assert cpu_build.build(cache_dir=cache) == path
    assert path.stat().st_mtime_ns == before


def test_key_depends_on_sources_flags_and_compiler(monkeypatch):
    compiler = cpu_build.find_compiler()
    key = cpu_build.build_key(compiler)
    assert cpu_build.build_key(compiler) == key
    monkeypatch.setattr(cpu_build, "FLAGS", (*cpu_build.FLAGS, "-DEFFLLM_TEST_FLAG"))
    assert cpu_build.build_key(compiler) != key


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFLLM_CACHE_DIR", str(tmp_path))
    assert cpu_build.cache_root() == tmp_path
    monkeypatch.delenv("EFFLLM_CACHE_DIR")
    assert cpu_build.cache_root().parts[-3:] == (".cache", "effllm", "kernels")


def test_missing_compiler_is_a_build_error(tmp_path):
    with pytest.raises(cpu_build.BuildError, match="no C compiler found"):
        cpu_build.build(compiler="/nonexistent/cc", cache_dir=tmp_path)


def test_failing_compiler_reports_its_output_and_leaves_no_file(tmp_path):
    fake = tmp_path / "broken-cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\n"
                    "echo 'error: this compiler always fails' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    cache = tmp_path / "cache"
    with pytest.raises(cpu_build.BuildError, match="this compiler always fails"):
        cpu_build.build(compiler=str(fake), cache_dir=cache)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_unwritable_cache_is_a_build_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(cpu_build.BuildError, match="EFFLLM_CACHE_DIR"):
        cpu_build.build(cache_dir=blocker / "cache")


def test_loading_a_non_library_is_a_build_error(tmp_path):
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    with pytest.raises(cpu_build.BuildError, match="cannot load"):
        cpu_build.load(junk)


def test_no_compiler_falls_back_to_torch_with_one_warning(monkeypatch, fresh_library):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("EFFLLM_KERNEL", "auto")
    with pytest.warns(RuntimeWarning, match="using the torch reference"):
        assert cpu_build.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert cpu_build.library() is None
        assert backend_for(torch.empty(0)) == "torch"
    monkeypatch.setenv("EFFLLM_KERNEL", "cpu")
    with pytest.raises(RuntimeError, match="could not be built"):
        backend_for(torch.empty(0))


def test_concurrent_builds_into_one_cache_agree(built, tmp_path):
    """Processes building at once (xdist workers, DDP ranks) each write a whole file or reuse one. The
    compiler is a stand-in that takes a while and then writes the library built above, so the test
    exercises the protocol without paying for two real compilations."""
    _, library_path = built
    slow = tmp_path / "slow-cc"
    slow.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo slow 1.0; exit 0; fi\n"
                    "for arg; do out=$arg; done\n"  # the last argument is the output path
                    f"sleep 0.5\ncp '{library_path}' \"$out\"\n")
    slow.chmod(slow.stat().st_mode | stat.S_IEXEC)
    cache = tmp_path / "cache"
    results, errors = [], []

    def build():
        try:
            results.append(cpu_build.build(compiler=str(slow), cache_dir=cache))
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1
    path = results[0]
    assert [p.name for p in path.parent.iterdir()] == [cpu_build.LIBRARY_NAME]
    assert path.read_bytes() == library_path.read_bytes()
    assert isinstance(cpu_build.load(path), ctypes.CDLL)
