"""What `import kernels` means when the repository root is on sys.path.

This folder is the package `fastexit.kernels` (setup.py's package_dir). `python -m pytest`,
`python -m bench.report`, pytest's rootdir insertion for bench/ and any script beside
setup.py put the repository root on sys.path, where the folder also looks like a top-level
package `kernels`: the name of Hugging Face's kernel hub, which transformers imports while it
builds a model. Reached under that name, the folder stands aside: the import gives the
installed package of that name, or fails as if the folder were not there.
"""
import importlib.machinery
import importlib.util
import os
import sys

_FOLDER = os.path.dirname(os.path.abspath(__file__))
_PARENT = os.path.dirname(_FOLDER)


def _is_parent(entry: str) -> bool:
    return os.path.realpath(entry or os.getcwd()) == os.path.realpath(_PARENT)


def _other_spec(name: str):
    """The spec the import system would give `name` if the repository root were not on sys.path."""
    path = [entry for entry in sys.path if not _is_parent(entry)]
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec(name, path)
        elif hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, None)
        else:
            continue
        if spec is not None and not (spec.origin or "").startswith(_FOLDER + os.sep):
            return spec
    return None


def stand_aside(name: str) -> None:
    """Put the installed package called `name` in sys.modules in place of this folder.

    The import statement that reached the folder then returns that package (the import system
    takes the module from sys.modules after running __init__). Without one, ImportError.
    """
    sys.modules.pop(__name__, None)  # this helper, imported under the name being given away
    spec = _other_spec(name)
    if spec is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the repository's {name}/ folder is fastexit.kernels, "
            f"not a top-level package)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
