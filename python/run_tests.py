#!/usr/bin/env python3
"""Builds dma_torch out of tree and runs its pytest suite (what ctest's python_tests runs).

usage: python3 python/run_tests.py [--build-dir DIR] [--no-build] [--tests PATH] [pytest args...]

The extension is built with `setup.py build` into DIR/lib (objects in DIR/obj; incremental), and
the tests (PATH: default python/tests; bench/mqar's ctest entry passes its own) run with DIR/lib
first on PYTHONPATH; nothing is written to the source tree. DIR defaults to python/build/tests.
Exit 77 (ctest: skipped) when torch or pytest is missing. MAX_JOBS (default 2) bounds the
parallel compile.
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    try:
        import pytest  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        print(f"SKIP: {e.name} is not importable by {sys.executable} "
              "(Debian: apt-get install python3-torch python3-pytest)")
        return 77
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default=os.path.join(HERE, "build", "tests"))
    ap.add_argument("--no-build", action="store_true", help="use the build already in --build-dir")
    ap.add_argument("--tests", default=os.path.join(HERE, "tests"), help="what pytest runs")
    args, pytest_args = ap.parse_known_args()
    build_dir = os.path.abspath(args.build_dir)
    lib = os.path.join(build_dir, "lib")
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", "2")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if not args.no_build:
        cmd = [sys.executable, "setup.py", "-q", "build", "--build-lib", lib,
               "--build-temp", os.path.join(build_dir, "obj")]
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=HERE, env=env)
        if rc != 0:
            print(f"FAIL: building dma_torch (exit {rc})")
            return 1
    env["PYTHONPATH"] = os.pathsep.join([lib] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    tests = os.path.abspath(args.tests)
    cmd = [sys.executable, "-m", "pytest", tests, "-q", "-rs", "-p", "no:cacheprovider"] + pytest_args
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
