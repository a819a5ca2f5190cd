"""Tests of the test oracle itself: dissect_read.py (dissect.hypervisor) and
integration/sparsecmp.py against Apple's real images, independent of asiffs.

Run with the venv's python from the repo root:
    .venv/bin/python -m unittest -v tests/interop/test_oracle.py
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VECTORS = os.environ.get("VECTORS") or os.path.join(os.path.dirname(REPO), "shared", "vectors")
DISSECT_READ = os.path.join(REPO, "tests", "interop", "dissect_read.py")
SPARSECMP = os.path.join(REPO, "integration", "sparsecmp.py")

BASIC_SHA = "fc6505543ff7fe23cd82f71378a79217cecff7cf3d3d67130dd5aa9f78efacb6"
BASIC_SIZE = 512_000_000
MIB = 1 << 20


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True)


class OracleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="asiffs-oracle-")
        cls.basic = cls.vector("apple-basic")
        cls.blank = cls.vector("apple-blank-10GB")
        cls.blank_big = cls.vector("apple-blank-10000GB")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def vector(cls, name: str) -> str:
        src = os.path.join(VECTORS, name + ".asif.gz")
        if not os.path.exists(src):
            raise FileNotFoundError(f"vector {src} not found (expected ../shared/vectors or $VECTORS)")
        dst = os.path.join(cls.tmp, name + ".asif")
        with gzip.open(src, "rb") as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo, 4 * MIB)
        return dst

    def dissect(self, *args: str) -> str:
        r = run(sys.executable, DISSECT_READ, *args)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout.strip()

    def test_basic_sha256_matches_readme(self):
        self.assertEqual(self.dissect("--sha256", self.basic), BASIC_SHA)

    def test_basic_info(self):
        info = json.loads(self.dissect("--info", self.basic))
        self.assertEqual(info["size"], BASIC_SIZE)
        self.assertEqual(info["stable_uuid"], "13db9632-b79f-4e95-aada-835d5ef97bba")
        self.assertEqual(info["active_directory_version"], 2)
        self.assertEqual(info["active_directory_offset"], 0x200)  # A is active

    def test_basic_raw_pattern(self):
        out = os.path.join(self.tmp, "basic.raw")
        self.dissect(self.basic, out)
        self.assertEqual(os.stat(out).st_size, BASIC_SIZE)
        with open(out, "rb") as f:
            for i in (0, 1, 100, 254):
                f.seek(i * MIB)
                self.assertEqual(f.read(MIB), bytes([i]) * MIB, f"chunk {i}")
            f.seek(255 * MIB)
            self.assertEqual(f.read(MIB), bytes(MIB))
        h = hashlib.sha256()
        with open(out, "rb") as f:
            for block in iter(lambda: f.read(4 * MIB), b""):
                h.update(block)
        self.assertEqual(h.hexdigest(), BASIC_SHA)
        os.unlink(out)

    def test_blank_reads_as_zeros(self):
        # dissect 3.21 on its own mishandles directory entries of 0 (it reads
        # the "table" from chunk 0, the header); dissect_read.py skips them.
        for path, size in ((self.blank, 10_000_000_000), (self.blank_big, 10_000_000_000_000)):
            info = json.loads(self.dissect("--info", path))
            self.assertEqual(info["size"], size)
            self.assertEqual(info["directory_versions"], [1, 0])
            out = os.path.join(self.tmp, "blank.raw")
            self.dissect(path, out)
            r = run(sys.executable, SPARSECMP, "--zero", out, str(size))
            self.assertEqual(r.returncode, 0, r.stderr)
            os.unlink(out)

    def test_sparsecmp_detects_differences(self):
        a = os.path.join(self.tmp, "a.raw")
        b = os.path.join(self.tmp, "b.raw")
        for p in (a, b):
            with open(p, "wb") as f:
                f.truncate(64 * MIB)
        self.assertEqual(run(sys.executable, SPARSECMP, a, b).returncode, 0)
        with open(b, "r+b") as f:
            f.seek(33 * MIB + 7)
            f.write(b"\x01")
        r = run(sys.executable, SPARSECMP, a, b)
        self.assertEqual(r.returncode, 1)
        self.assertIn(str(33 * MIB + 7), r.stderr)
        self.assertEqual(run(sys.executable, SPARSECMP, "--zero", b, str(64 * MIB)).returncode, 1)
        self.assertEqual(run(sys.executable, SPARSECMP, "--zero", a, str(64 * MIB + 1)).returncode, 1)
        with open(a, "r+b") as f:  # written zeros are still zeros
            f.seek(MIB)
            f.write(bytes(MIB))
        self.assertEqual(run(sys.executable, SPARSECMP, "--zero", a, str(64 * MIB)).returncode, 0)


if __name__ == "__main__":
    unittest.main()
