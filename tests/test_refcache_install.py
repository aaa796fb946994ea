"""Installing a reference cache is durable: the destination always holds one complete cache.

:func:`lmkl.refcache.build.install` renames an existing cache aside (``.<name>.previous.tmp``),
renames the new build into place, then removes the old one; :func:`recover` (run by every open
and build) finishes an install a crash left half done.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from lmkl.engine.cache_build import build_cache
from lmkl.errors import OutputError
from lmkl.refcache.format import MANIFEST, open_cache
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, WindowSpec

WINDOWS = WindowSpec(context_length=48, stride=24)
COMPUTE = ComputeSpec(batch_size=3, compile=False)


@pytest.fixture(scope="module")
def setup(tiny_pair, tmp_path_factory) -> dict:
    """An exact cache of the tiny reference (copied by each test), and how to build another."""
    root = tmp_path_factory.mktemp("install")
    lines = tiny_pair["heldout"].read_text().splitlines()[:2]
    data = root / "small.jsonl"
    data.write_text(
        "".join(json.dumps({"text": json.loads(x)["text"][:400]}) + "\n" for x in lines)
    )
    ref = ModelSpec(model=str(tiny_pair["reference"]), label="ref", dtype="float32")
    build_cache(ref, DataSpec(source=str(data)), WINDOWS, COMPUTE, root / "built" / "old")
    return {"root": root, "data": data, "ref": ref, "old": root / "built" / "old"}


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its content hash."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def old_cache(setup, tmp_path) -> Path:
    """A copy of the old cache alone in its own parent folder."""
    out = tmp_path / "parent" / "cache"
    shutil.copytree(setup["old"], out)
    return out


def rebuild(setup, out: Path, resume: bool = False) -> dict:
    """Build a different (top-8) cache over ``out`` (or resume that build)."""
    return build_cache(
        setup["ref"],
        DataSpec(source=str(setup["data"])),
        WINDOWS,
        COMPUTE,
        out,
        top_k=8,
        overwrite=not resume,
        resume=resume,
    )


def test_failed_final_rename_keeps_the_old_cache(setup, old_cache, monkeypatch):
    before = tree(old_cache)
    manifest = json.loads((old_cache / MANIFEST).read_text())
    real_rename = Path.rename
    failed = []

    def rename(self: Path, target):
        target = Path(target)
        # The finished cache in the build directory (".cache.build/cache") renamed onto the
        # destination.
        is_build = self.parent.name == f".{old_cache.name}.build"
        if is_build and target == old_cache:
            failed.append(self)
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    with monkeypatch.context() as patch, pytest.raises(OutputError, match="Input/output error"):
        patch.setattr(Path, "rename", rename)
        rebuild(setup, old_cache)
    assert failed, "the final rename was never attempted"
    assert tree(old_cache) == before  # the old cache, every file as it was
    cache = open_cache(old_cache)
    assert cache.manifest == manifest and cache.mode == "exact"
    # The finished build is kept (not computed again): --resume installs it, leaving nothing.
    assert sorted(p.name for p in old_cache.parent.iterdir()) == [".cache.build", "cache"]
    new = rebuild(setup, old_cache, resume=True)
    assert open_cache(old_cache).manifest == new and new["mode"] == "topk"
    assert [p.name for p in old_cache.parent.iterdir()] == [old_cache.name]  # nothing left over


def test_crash_between_the_renames_is_repaired_on_open(setup, old_cache):
    before = tree(old_cache)
    manifest = json.loads((old_cache / MANIFEST).read_text())
    aside = old_cache.parent / f".{old_cache.name}.previous.tmp"
    old_cache.rename(aside)  # first rename done, killed before the second
    assert not old_cache.exists()

    cache = open_cache(old_cache)
    assert cache.manifest == manifest
    assert tree(old_cache) == before
    assert not aside.exists()


def test_crash_after_both_renames_keeps_the_new_cache_on_open(setup, old_cache, tmp_path):
    new = rebuild(setup, tmp_path / "elsewhere" / "new")
    aside = old_cache.parent / f".{old_cache.name}.previous.tmp"
    old_cache.rename(aside)
    (tmp_path / "elsewhere" / "new").rename(old_cache)  # killed before the old one was removed

    cache = open_cache(old_cache)
    assert cache.mode == "topk" and cache.manifest["created"] == new["created"]
    assert not aside.exists()


def test_successful_rebuild_leaves_no_aside_or_temporary_directory(setup, old_cache):
    old_manifest = json.loads((old_cache / MANIFEST).read_text())
    new = rebuild(setup, old_cache)
    assert [p.name for p in old_cache.parent.iterdir()] == [old_cache.name]
    cache = open_cache(old_cache)
    assert cache.mode == "topk" and cache.manifest["created"] == new["created"]
    assert new["created"] != old_manifest["created"]
