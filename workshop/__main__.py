"""The workshop's command line (workshop/README.md), run from the repository root:

    python -m workshop list          # the exercises, in order
    python -m workshop start 4       # turn the repository into exercise 4 (applies its start.patch)
    python -m workshop check 4       # run exercise 4's checks: what passes, what is still wrong
    python -m workshop reset 4       # undo `start 4` (--discard: also drop your edits to its files)

`start` and `reset` use `git apply` and refuse to overwrite uncommitted changes. `check` runs the
exercise's checks.py with pytest and prints one line per check; it exits 0 when all pass.
"""
import argparse
import os
import shutil
import subprocess
import sys

from workshop import ROOT, exercises


def _folder(n):
    found = exercises()
    if n not in found:
        sys.exit(f"there is no exercise {n}: the exercises are {', '.join(map(str, found))} "
                 "(python -m workshop list)")
    return found[n]


def _title(folder):
    path = os.path.join(folder, "README.md")
    if not os.path.exists(path):
        return os.path.basename(folder)
    with open(path) as f:
        return f.readline().lstrip("# ").split(". ", 1)[-1].strip()      # "# 4. Title" -> Title


def _rel(path):
    return os.path.relpath(path, ROOT)


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def _in_repo():
    r = _git("rev-parse", "--show-toplevel")
    return r.returncode == 0 and os.path.realpath(r.stdout.strip()) == os.path.realpath(ROOT)


def _patch_files(patch):
    """[(path, created)] of the files a git patch touches (created: the patch adds the file)."""
    files, created = [], False
    with open(patch) as f:
        for line in f:
            if line.startswith("--- "):
                created = line.strip() == "--- /dev/null"
            elif line.startswith("+++ "):
                files.append((line[4:].strip().split("/", 1)[1], created))
    return files


def _patch_state(folder):
    """(patch path, files, "started" | "not started" | "changed"), via git apply --check."""
    patch = os.path.join(folder, "start.patch")
    if shutil.which("git") is None:
        sys.exit(f"this needs git (git apply); without it: patch -p1 < {_rel(patch)}")
    if _git("apply", "--check", "-R", patch).returncode == 0:
        state = "started"
    elif _git("apply", "--check", patch).returncode == 0:
        state = "not started"
    else:
        state = "changed"
    return patch, _patch_files(patch), state


def _done(files):
    return "; ".join(f"{p} {'removed' if created else 'as committed'}" for p, created in files)


def cmd_list(_):
    for n, folder in exercises().items():
        print(f"{n}. {_title(folder)}  ({_rel(folder)}/README.md)")


def cmd_start(a):
    folder = _folder(a.n)
    patch, files, state = _patch_state(folder)
    paths = [p for p, _ in files]
    if state == "started":
        sys.exit(f"exercise {a.n} is already started: python -m workshop check {a.n} (or reset {a.n})")
    if _in_repo():
        dirty = _git("status", "--porcelain", "--", *paths).stdout.strip()
        if dirty:
            sys.exit(f"exercise {a.n} changes {', '.join(paths)}, and these have uncommitted "
                     f"changes:\n{dirty}\nCommit or stash them first (git stash), then start again.")
    if state == "changed":
        err = _git("apply", "--check", patch).stderr.strip().splitlines()
        sys.exit(f"{_rel(patch)} does not apply to this tree ({err[0] if err else 'git apply failed'}). "
                 f"Were {', '.join(paths)} changed? Start from a clean checkout (git stash).")
    r = _git("apply", patch)
    if r.returncode:
        sys.exit(f"git apply {_rel(patch)} failed: {r.stderr.strip()}")
    print(f"exercise {a.n} started: {_title(folder)}\n"
          f"  read   {_rel(folder)}/README.md\n"
          f"  edit   {', '.join(paths)}\n"
          f"  check  python -m workshop check {a.n}\n"
          f"  undo   python -m workshop reset {a.n}")


def cmd_reset(a):
    folder = _folder(a.n)
    patch, files, state = _patch_state(folder)
    paths = [p for p, _ in files]
    if state == "not started":
        print(f"exercise {a.n} is not started: nothing to reset")
        return
    if state == "started":
        r = _git("apply", "-R", patch)
        if r.returncode:
            sys.exit(f"git apply -R {_rel(patch)} failed: {r.stderr.strip()}")
        left = _git("status", "--porcelain", "--", *paths).stdout.strip() if _in_repo() else ""
        print(f"exercise {a.n} reset: start.patch undone" + (
            f"; your other edits stay (git diff -- {' '.join(paths)})" if left else f": {_done(files)}"))
        return
    if not a.discard:
        sys.exit(f"your edits to {', '.join(paths)} go beyond what start.patch wrote, so it cannot "
                 f"simply be undone. `python -m workshop reset {a.n} --discard` puts these files "
                 "back as committed (your edits are lost: copy them first to keep them).")
    if not _in_repo():
        sys.exit("--discard restores files from git: this folder is not a git checkout")
    for path, created in files:
        if created:
            if os.path.exists(os.path.join(ROOT, path)):
                os.remove(os.path.join(ROOT, path))
        else:
            r = _git("checkout", "HEAD", "--", path)
            if r.returncode:
                sys.exit(f"git checkout HEAD -- {path} failed: {r.stderr.strip()}")
    print(f"exercise {a.n} reset: {_done(files)} (your edits dropped)")


# ----------------------------------------------------------------------------- check
class _Reporter:
    """pytest plugin: one line per check, in words (the first paragraph of the check's docstring,
    formatted with its parameters), and the failure's message or exception."""

    def __init__(self):
        self.passed, self.failed, self.skipped = [], [], []

    def _describe(self, item):
        doc = " ".join((item.function.__doc__ or item.name).strip().split("\n\n")[0].split())
        params = getattr(getattr(item, "callspec", None), "params", {})
        return doc.format(**params) if params else doc

    def _message(self, excinfo):
        import pytest
        e = excinfo.value
        if isinstance(e, pytest.fail.Exception):
            return e.msg
        if isinstance(e, AssertionError):
            text = str(e).split("\nassert ")[0].strip()     # drop pytest's rewritten expression
            return text if text and not text.startswith("assert ") else "a check failed: " + str(e)
        where = ""
        for entry in reversed(excinfo.traceback):   # the innermost frame in this repository
            path = str(entry.path)
            if path.startswith(ROOT) and "site-packages" not in path:
                where = f" in {_rel(path)}:{entry.lineno + 1} ({entry.name})"
                break
        return f"{type(e).__name__}{where}: {e}"

    def pytest_runtest_makereport(self, item, call):
        import pytest
        if call.when != "call" and call.excinfo is None:
            return
        desc = self._describe(item)
        if call.excinfo is None:
            self.passed.append(desc)
            print(f"  ok    {desc}", flush=True)
        elif call.excinfo.errisinstance(pytest.skip.Exception):
            self.skipped.append(call.excinfo.value.msg)
            print(f"  skip  {desc}: {call.excinfo.value.msg}", flush=True)
        else:
            self.failed.append(desc)
            msg = self._message(call.excinfo).replace("\n", "\n        ")
            print(f"  FAIL  {desc}\n        {msg}", flush=True)


def run_check(n, first_failure=False):
    """Run exercise n's checks.py; returns True when every check passed."""
    import pytest
    folder = _folder(n)
    print(f"\nExercise {n}: {_title(folder)}  ({_rel(folder)}/README.md)", flush=True)
    rep = _Reporter()
    args = [os.path.join(folder, "checks.py"), "-s", "-p", "no:cacheprovider", "-p",
            "no:terminal", "--import-mode=importlib", "--rootdir", folder] + (["-x"] if first_failure else [])
    code = pytest.main(args, plugins=[rep])
    total = len(rep.passed) + len(rep.failed)
    if rep.skipped and not total:
        print(f"every check was skipped on this machine ({rep.skipped[0]})")
        return True
    if code not in (0, 1) or not total:   # a collection error: checks.py or an import failed
        print(f"  FAIL  the checks could not run (pytest exit code {code}). Run them with pytest to "
              f"see why: python -m pytest -x {_rel(folder)}/checks.py")
        return False
    if rep.failed:
        print(f"{len(rep.passed)} of {total} checks pass; still to fix: {len(rep.failed)} (messages "
              f"above). Hints: {_rel(folder)}/README.md")
        return False
    print(f"all {total} checks pass. The reference solution is {_rel(folder)}/solution.patch")
    return True


def cmd_check(a):
    import torch
    if not torch.cuda.is_available():   # Triton's interpreter must be chosen before triton loads
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)            # the checks are tiny: a second thread only waits
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    ok = [run_check(n, a.first_failure) for n in a.n]
    sys.exit(0 if all(ok) else 1)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m workshop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the exercises, in order")
    p = sub.add_parser("start", help="turn the repository into exercise N (git apply start.patch)")
    p.add_argument("n", type=int)
    p = sub.add_parser("check", help="run exercise N's checks (several numbers: one after another)")
    p.add_argument("n", type=int, nargs="+")
    p.add_argument("--first-failure", action="store_true", help="stop at the first failing check")
    p = sub.add_parser("reset", help="undo start N")
    p.add_argument("n", type=int)
    p.add_argument("--discard", action="store_true",
                   help="also when you edited the files: restore them from the last commit")
    a = ap.parse_args(argv)
    {"list": cmd_list, "start": cmd_start, "check": cmd_check, "reset": cmd_reset}[a.command](a)


if __name__ == "__main__":
    main()
