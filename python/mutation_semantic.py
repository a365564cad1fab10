"""Semantic mutation testing (`make mutation-semantic`): hand-written plausible bugs.

`make mutation` (mutmut) swaps operators one token at a time; this program applies the bugs an
engineer could plausibly write — a mask shifted by one position, a flag restored as True
instead of as recorded, a side decided by a name prefix — listed in tests/semantic_mutants.json:

    {"id": "answer-mask-shifted", "file": "mlan_train/evaluate.py",
     "original": "<exact snippet, once in the file>", "replacement": "<the bug>",
     "bug": "<one line: what went wrong>", "tests": ["tests/test_x.py", "-k", "..."]}

Each mutant is applied by exact replacement in a scratch copy of the tree (never the checkout),
and its tests run there (`pytest -x -q`, with a timeout). A mutant is killed when a test fails
(or the run times out), survived when all pass. Prints one line per mutant and the score;
writes build/mutation-semantic.json. When a real bug is fixed, add it here: the bug,
reintroduced, is a mutant.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlan_kernels.help_format import DefaultsHelpFormatter

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "tests" / "semantic_mutants.json"
RESULTS = ROOT / "build" / "mutation-semantic.json"
FIELDS = ("id", "file", "original", "replacement", "bug", "tests")
# What the scratch copy leaves out: at the top, git metadata, environments, build and run
# outputs; at any depth, caches.
NOT_COPIED_TOP = (".git", ".venv*", "build", "dist", "runs", "data", ".benchmarks", "*.egg-info")
NOT_COPIED = ("__pycache__", ".pytest_cache")


def load_mutants(path=MUTANTS, root=ROOT) -> list:
    """The mutant list, checked: every field present and a string (tests: a non-empty list of
    pytest arguments whose test files exist), ids unique, each original occurring exactly once
    in its file and differing from its replacement. ValueError naming the mutant otherwise."""
    with open(path, encoding="utf-8") as handle:
        mutants = json.load(handle)
    if not isinstance(mutants, list):
        raise ValueError(f"{path}: expected a JSON list of mutants, got {type(mutants).__name__}")
    seen = set()
    for number, mutant in enumerate(mutants):
        name = mutant.get("id", f"#{number}") if isinstance(mutant, dict) else f"#{number}"
        if not isinstance(mutant, dict) or set(mutant) != set(FIELDS):
            raise ValueError(f"{path}: mutant {name}: expected exactly the fields {', '.join(FIELDS)}")
        if not all(isinstance(mutant[key], str) and mutant[key] for key in FIELDS[:5]):
            raise ValueError(f"{path}: mutant {name}: id, file, original, replacement and bug must "
                             f"be non-empty strings")
        if name in seen:
            raise ValueError(f"{path}: mutant id {name!r} appears twice")
        seen.add(name)
        if "\n" in mutant["bug"]:
            raise ValueError(f"{path}: mutant {name}: bug must be one line")
        tests = mutant["tests"]
        if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
            raise ValueError(f"{path}: mutant {name}: tests must be a non-empty list of strings")
        for test in tests:
            if test.startswith("tests/") and not (root / test.split("::")[0]).is_file():
                raise ValueError(f"{path}: mutant {name}: no test file {test.split('::')[0]}")
        source = root / mutant["file"]
        if not source.is_file():
            raise ValueError(f"{path}: mutant {name}: no file {mutant['file']}")
        count = source.read_text(encoding="utf-8").count(mutant["original"])
        if count != 1:
            raise ValueError(f"{path}: mutant {name}: the original occurs {count} times in "
                             f"{mutant['file']}, expected exactly once")
        if mutant["original"] == mutant["replacement"]:
            raise ValueError(f"{path}: mutant {name}: replacement equals the original")
    return mutants


def scratch_copy(root=ROOT) -> Path:
    """A copy of the tree (sources, tests, the built extension) in a new temporary directory."""
    scratch = Path(tempfile.mkdtemp(prefix="mlan-semantic-")) / "tree"
    anywhere, top = shutil.ignore_patterns(*NOT_COPIED), shutil.ignore_patterns(*NOT_COPIED_TOP)

    def ignore(directory, names):
        return anywhere(directory, names) | (top(directory, names) if Path(directory) == root else set())
    shutil.copytree(root, scratch, ignore=ignore, symlinks=True)
    return scratch


def run_tests(tree: Path, tests, timeout: float) -> tuple:
    """(pytest exit status, or None on timeout; seconds) of `tests` run in `tree`."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        status = subprocess.run(command, cwd=tree, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        status = None
    return status, time.perf_counter() - start


def check_imports_from(tree: Path):
    """RuntimeError unless the packages import from `tree` (not an installed copy)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    code = ("import mlan_kernels, mlan_train, mlan_bench; "
            "print(mlan_kernels.__file__, mlan_train.__file__, mlan_bench.__file__)")
    paths = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True,
                           text=True, check=True).stdout.split()
    if not all(Path(path).resolve().is_relative_to(tree.resolve()) for path in paths):
        raise RuntimeError(f"the packages import from {paths}, not from the scratch copy {tree}")


def verdict(status) -> str:
    """killed (a test failed, or collection failed), timeout (counted as killed), survived (all
    passed) or no-tests (pytest collected nothing: the mutant's test selection is wrong)."""
    if status is None:
        return "timeout"
    return {0: "survived", 5: "no-tests"}.get(status, "killed")


def run_mutants(mutants, tree: Path, timeout: float, baseline: bool = False) -> list:
    """Apply each mutant in `tree` (restored after), run its tests; one result dict each.
    baseline: run each mutant's tests on the unmutated tree instead (every one must pass)."""
    results = []
    for mutant in mutants:
        path = tree / mutant["file"]
        original = path.read_text(encoding="utf-8")
        if not baseline:
            path.write_text(original.replace(mutant["original"], mutant["replacement"], 1), encoding="utf-8")
        try:
            status, seconds = run_tests(tree, mutant["tests"], timeout)
        finally:
            path.write_text(original, encoding="utf-8")
        result = {"id": mutant["id"], "file": mutant["file"], "status": status,
                  "verdict": verdict(status), "seconds": round(seconds, 1)}
        results.append(result)
        shown = ({"survived": "passes"}.get(result["verdict"], "FAILS")) if baseline else result["verdict"]
        print(f"{shown:>9} {seconds:6.1f} s  {mutant['id']}: {mutant['bug']}", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--mutants", default=str(MUTANTS.relative_to(ROOT)),
                        help="the mutant list (JSON; relative to the repository)")
    parser.add_argument("--only", nargs="+", metavar="ID",
                        help="run only these mutant ids (default: all)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's tests")
    parser.add_argument("--baseline", action="store_true",
                        help="run every mutant's tests on the unmutated tree (all must pass)")
    parser.add_argument("--json", default=str(RESULTS.relative_to(ROOT)),
                        help="where to write the results (relative to the repository)")
    args = parser.parse_args(argv)
    mutants = load_mutants(ROOT / args.mutants)
    results_path = ROOT / args.json
    if args.only:
        unknown = set(args.only) - {m["id"] for m in mutants}
        if unknown:
            parser.error(f"--only: no mutant {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m["id"] in args.only]
    tree = scratch_copy()
    try:
        check_imports_from(tree)
        start = time.perf_counter()
        results = run_mutants(mutants, tree, args.timeout, args.baseline)
        total = time.perf_counter() - start
    finally:
        shutil.rmtree(tree.parent, ignore_errors=True)
    counts = {name: sum(r["verdict"] == name for r in results)
              for name in ("killed", "timeout", "survived", "no-tests")}
    scored = counts["killed"] + counts["timeout"] + counts["survived"]
    score = (counts["killed"] + counts["timeout"]) / scored if scored else 0.0
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with open(results_path, "w", encoding="utf-8") as handle:
        json.dump({"baseline": args.baseline, "counts": counts, "score": score,
                   "seconds": round(total), "results": results}, handle, indent=1)
    if args.baseline:
        print(f"baseline: {counts['survived']} of {len(results)} test selections pass unmutated "
              f"({total:.0f} s)")
        return 0 if counts["survived"] == len(results) else 1
    print(f"semantic mutation score: {score:.1%} ({counts['killed'] + counts['timeout']}/{scored} "
          f"killed, {counts['timeout']} of them by timeout; {counts['no-tests']} with no tests) "
          f"in {total:.0f} s")
    return 0 if counts["no-tests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
