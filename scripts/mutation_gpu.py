"""Mutation testing of GPU-only code: every mutant of a module tested by fresh pytest processes on a GPU machine.

scripts/mutation.py runs mutmut, which runs each mutant in a process forked from one that has already loaded the
tests. CUDA does not work in such a fork, and on a CPU the GPU tests skip, so code that only GPU tests reach
(rwkv7/train/graphed.py, the CUDA graph) comes out there as "no tests". Hence two steps:

    python scripts/mutation_gpu.py make rwkv7/train/graphed.py --dir .cache/mut-graphed            # here (mutmut)
    python scripts/mutation_gpu.py run .cache/mut-graphed -t tests/test_train_gpu.py -k graphed -j 4  # on the GPU

`make` lets mutmut write the module's mutants and saves each as a whole file (DIR/mutant-NNN.py, names.json maps
them to mutmut's names). `run` needs only torch and pytest: it runs the tests on the unmutated tree (they must
pass), then each mutant in a copy of the tree of its own, -j at a time, and prints each outcome (killed: the tests
failed; timeout, counted as killed as mutmut does; survived: they passed) and the score. docs/TESTING.md keeps the
scores and the survivors judged equivalent.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import difflib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ("rwkv7", "tests", "recipes", "kernels", "entrypoint.py", "pyproject.toml")  # what the tests need


def make(module: str, dest: Path) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from mutation import results, scratch_copy, write_config

    scratch = dest / "scratch"
    shutil.rmtree(dest, ignore_errors=True)
    scratch.mkdir(parents=True)
    scratch_copy(scratch, None)
    # a test that skips on this CPU: mutmut writes the mutants, then stops (no test covers them here)
    write_config(scratch, [module], ["tests/test_train_gpu.py"], None)
    env = {**os.environ, "PYTHONPATH": "", "WANDB_MODE": "disabled"}
    with open(scratch / "mutmut-run.log", "w") as log:  # named in the error below if no mutant was made
        subprocess.run([sys.executable, "-m", "mutmut", "run"], cwd=scratch, env=env, stdout=log,
                       stderr=subprocess.STDOUT)
    original = (scratch / module).read_text()
    names = [name for name, _ in results(scratch)]
    if not names:
        raise SystemExit(f"mutmut made no mutants of {module} (see {scratch}/mutmut-run.log)")
    for i, name in enumerate(names):
        subprocess.run([sys.executable, "-m", "mutmut", "apply", name], cwd=scratch, env=env, check=True,
                       capture_output=True)
        (dest / f"mutant-{i:03d}.py").write_text((scratch / module).read_text())
        (scratch / module).write_text(original)
    (dest / "original.py").write_text(original)
    (dest / "names.json").write_text(json.dumps({"module": module, "mutants": names}, indent=1, ensure_ascii=False))
    shutil.rmtree(scratch)
    print(f"{len(names)} mutants of {module} in {dest}")
    return 0


def _copy_tree(to: Path) -> None:
    to.mkdir(parents=True)
    for name in TREE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, to / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, to / name)


def _pytest(tree: Path, tests: list[str], keyword: str | None, timeout: float) -> str:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    if keyword:
        cmd += ["-k", keyword]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(
        [str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    if p.returncode == 0:
        return "survived"
    if p.returncode == 1:
        return "killed"
    return f"error {p.returncode}: {(p.stdout + p.stderr)[-300:]}"  # collection or usage error: not a result


def run(src: Path, tests: list[str], keyword: str | None, jobs: int, timeout: float, show: bool) -> int:
    meta = json.loads((src / "names.json").read_text())
    module, names = meta["module"], meta["mutants"]
    original = (src / "original.py").read_text()
    if (ROOT / module).read_text() != original:
        raise SystemExit(f"{module} differs from the one the mutants were made from: run `make` again")
    work = Path(tempfile.mkdtemp(prefix="rwkv7-mutation-gpu-"))
    t0 = time.time()
    _copy_tree(work / "baseline")
    base = _pytest(work / "baseline", tests, keyword, timeout)
    print(f"unmutated: {base} ({time.time() - t0:.0f} s)", flush=True)
    if base != "survived":
        raise SystemExit("the tests fail on the unmutated tree: fix that first")
    per_mutant = max(3 * (time.time() - t0), 60.0)  # a mutant slower than 3x the clean run (60 s at least): timeout

    def one(i: int) -> str:
        tree = work / f"m{i:03d}"
        _copy_tree(tree)
        shutil.copy2(src / f"mutant-{i:03d}.py", tree / module)
        outcome = _pytest(tree, tests, keyword, min(per_mutant, timeout))
        shutil.rmtree(tree, ignore_errors=True)
        return outcome

    outcomes: dict[str, str] = {}
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for name, outcome in zip(names, pool.map(one, range(len(names)))):
            outcomes[name] = outcome
            print(f"{name}: {outcome}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    killed = sum(o in ("killed", "timeout") for o in outcomes.values())
    survived = [n for n, o in outcomes.items() if o == "survived"]
    errors = len(outcomes) - killed - len(survived)
    print(f"{module}: {len(names)} mutants, killed {killed}, survived {len(survived)}, errors {errors}; "
          f"score {killed}/{killed + len(survived)} = {killed / max(killed + len(survived), 1):.1%} "
          f"({time.time() - t0:.0f} s, -j {jobs})")
    if show:
        for name in survived:
            mutated = (src / f"mutant-{names.index(name):03d}.py").read_text()
            diff = difflib.unified_diff(original.splitlines(), mutated.splitlines(), lineterm="", n=0)
            print(f"--- {name}\n" + "\n".join(ln for ln in diff if ln[:1] in "+-" and ln[:3] not in ("+++", "---")))
    return 0 if not errors else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write the mutants of MODULE (here, with mutmut)")
    mk.add_argument("module")
    mk.add_argument("--dir", type=Path, required=True)
    rn = sub.add_parser("run", help="test every mutant in DIR (on the GPU machine)")
    rn.add_argument("dir", type=Path)
    rn.add_argument("-t", "--tests", nargs="+", required=True)
    rn.add_argument("-k", dest="keyword")
    rn.add_argument("-j", "--jobs", type=int, default=4)
    rn.add_argument("--timeout", type=float, default=600.0, help="seconds for one pytest run at most")
    rn.add_argument("--show", action="store_true", help="print the diff of every surviving mutant")
    a = ap.parse_args()
    if a.cmd == "make":
        return make(a.module, a.dir)
    return run(a.dir, a.tests, a.keyword, a.jobs, a.timeout, a.show)


if __name__ == "__main__":
    sys.exit(main())
