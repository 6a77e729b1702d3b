"""The workshop track: exercises on both papers, each with a statement, a start.patch, a
solution.patch and the checks that `python -m workshop check N` runs (workshop/README.md)."""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def exercises():
    """{number: folder path} of every exercise folder (named NN_title)."""
    found = {}
    for name in sorted(os.listdir(HERE)):
        path = os.path.join(HERE, name)
        if os.path.isdir(path) and name[:2].isdigit() and name[2:3] == "_":
            found[int(name[:2])] = path
    return found


def load(path, name=None):
    """Import a Python file by path (exercise folders start with a digit, so they are not
    packages); each file gets its own module name, so two exercises' answers.py never clash.
    Returns None when the file does not exist."""
    if not os.path.exists(path):
        return None
    name = name or "workshop_" + os.path.relpath(path, HERE).replace(os.sep, "_")[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
