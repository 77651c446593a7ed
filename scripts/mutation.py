"""Mutation testing with mutmut, in a scratch copy of the tree (the worktree is never touched).

    python scripts/mutation.py -m rwkv7/train/schedule.py -t tests/test_alignment.py tests/test_run_parts.py
    python scripts/mutation.py -m rwkv7/model.py -t tests/test_alignment.py -k "not compiled" --rev HEAD~3

Copies the files git knows (tracked and untracked-but-not-ignored; with --rev, that commit's tree) to a scratch
folder, writes a [mutmut] section that mutates only the given modules and runs only the given tests, runs
`mutmut run`, and prints per module the count of each outcome and the score: killed / (killed + survived +
no tests); timeouts count as killed, as mutmut does, and the score without them is printed too (on a loaded machine
a slow test can time out). --show prints the diff of every surviving mutant.
docs/TESTING.md lists the scores and the surviving mutants judged equivalent.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILLED = ("killed", "timeout")
LIVE = ("survived", "no tests")


def scratch_copy(dest: Path, rev: str | None) -> None:
    if rev:
        tar = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        tarfile.open(fileobj=io.BytesIO(tar)).extractall(dest)
        return
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)


# Lines left unmutated: matplotlib calls (colours, widths, fonts, positions of loss.png). What the figure shows (its
# curves' data, band, markers, labels, lr axis, title) is asserted by tests/test_trajectory.py on the figure itself.
DISPLAY_ONLY = [r"^\s*(ax2?|fig|plt|matplotlib)\.", r"= plt\.subplots\(",
                r"^\s*(color|label|markersize|markeredgewidth|linewidth|frameon|fontsize)="]


def write_config(dest: Path, modules: list[str], tests: list[str], keyword: str | None) -> None:
    def block(items):
        return "".join(f"\n    {x}" for x in items)

    pytest_args = ["-p", "no:cacheprovider", "-x", "-q"] + (["-k", keyword] if keyword else [])
    (dest / "setup.cfg").write_text(f"[mutmut]\nsource_paths = rwkv7\nonly_mutate ={block(modules)}\n"
                                    f"pytest_add_cli_args_test_selection ={block(tests)}\n"
                                    f"pytest_add_cli_args ={block(pytest_args)}\n"
                                    f"also_copy ={block(['recipes', 'kernels', 'entrypoint.py', 'tests'])}\n"
                                    f"do_not_mutate_patterns ={block(DISPLAY_ONLY)}\n"
                                    # mutants run in processes forked from a server that never ran a test: forked
                                    # after torch's OpenMP pool has started, a child hangs in its first parallel op
                                    "process_isolation = forkserver\n"
                                    # a mutant slower than 8x (the tests' own time + 5 s) counts as a timeout
                                    "timeout_multiplier = 4.0\ntimeout_constant = 5.0\n")


def results(dest: Path) -> list[tuple[str, str]]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=dest,
                         capture_output=True, text=True).stdout
    return re.findall(r"^\s*(\S+): (\w[\w ]*)$", out, re.M)


def module_of(mutant: str) -> str:
    """rwkv7.train.schedule.x_learning_rate__mutmut_3 -> rwkv7/train/schedule.py"""
    parts = mutant.split(".")
    cut = next(i for i, p in enumerate(parts) if p.startswith(("x_", "x\u01c1")))
    return "/".join(parts[:cut]) + ".py"


def report(rows: list[tuple[str, str]]) -> dict:
    per = collections.defaultdict(collections.Counter)
    for name, status in rows:
        per[module_of(name)][status] += 1
    for module, c in sorted(per.items()):
        killed, live = sum(c[s] for s in KILLED), sum(c[s] for s in LIVE)
        plain = c["killed"]
        print(f"{module}: {dict(c)}; score {killed}/{killed + live} = {killed / max(killed + live, 1):.1%}"
              f" (without timeouts: {plain}/{plain + live} = {plain / max(plain + live, 1):.1%})")
    return per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--modules", nargs="+", required=True, help="files to mutate, e.g. rwkv7/init.py")
    ap.add_argument("-t", "--tests", nargs="+", required=True, help="test files that should kill the mutants")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression (leave out slow tests)")
    ap.add_argument("-j", "--max-children", type=int, default=2)
    ap.add_argument("--rev", help="mutate and test this commit's tree instead of the worktree")
    ap.add_argument("--keep", metavar="DIR", help="use (and keep) this scratch folder")
    ap.add_argument("--show", action="store_true", help="print the diff of every surviving mutant")
    args = ap.parse_args()
    dest = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rwkv7-mutation-"))
    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / "rwkv7").is_dir():
        scratch_copy(dest, args.rev)
    write_config(dest, args.modules, args.tests, args.keyword)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    with open(dest / "mutmut-run.log", "w") as log:
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)], cwd=dest,
                       env=env, stdout=log, stderr=subprocess.STDOUT)
    rows = results(dest)
    report(rows)
    if args.show:
        for name, status in rows:
            if status in LIVE:
                diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=dest, capture_output=True,
                                      text=True).stdout
                print(f"--- {name} ({status})\n" + "\n".join(ln for ln in diff.splitlines()
                                                              if ln[:1] in "+-" and ln[:3] not in ("+++", "---")))
    if not args.keep:
        shutil.rmtree(dest, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
