"""The repository's top-level folders never stand in for installed packages of the same name.

`python -m pytest` (and pytest's rootdir insertion for bench/) puts the repository root on
sys.path, where kernels/ looks like a top-level package `kernels`: the name of Hugging Face's
kernel hub, which transformers >= 5.25 imports while it builds a model.
"""
import importlib.metadata
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS_FOLDER = os.path.join(REPO_ROOT, "kernels")


def _installed_kernels_dir():
    """The folder of the PyPI `kernels` package, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = next(f for f in dist.files if str(f).replace("\\", "/") == "kernels/__init__.py")
    return os.path.dirname(os.path.realpath(dist.locate_file(init)))


def _import_kernels_with_root_first(*python_flags):
    """`import kernels` in a fresh interpreter whose sys.path starts at the repository root."""
    code = ("import sys, os; sys.path.insert(0, os.getcwd()); import kernels; "
            "print(os.path.dirname(os.path.realpath(kernels.__file__)))")
    return subprocess.run([sys.executable, *python_flags, "-c", code], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_repository_root_shadows_nothing_in_the_test_process():
    installed = _installed_kernels_dir()
    if installed is None:
        with pytest.raises(ImportError, match="kernels"):
            import kernels  # noqa: F401
        return
    import kernels
    assert os.path.dirname(os.path.realpath(kernels.__file__)) == installed
    assert not os.path.realpath(kernels.__file__).startswith(KERNELS_FOLDER + os.sep)


def test_import_kernels_with_repository_root_first_on_sys_path():
    result = _import_kernels_with_root_first()
    installed = _installed_kernels_dir()
    if installed is None:
        assert result.returncode != 0
        assert "No module named 'kernels'" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == installed


def test_without_the_pypi_package_import_kernels_finds_nothing():
    result = _import_kernels_with_root_first("-S")  # no site-packages: nothing installed
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in result.stderr


def test_fastexit_kernels_still_imports_from_the_folder():
    import fastexit.kernels
    assert os.path.dirname(os.path.realpath(fastexit.kernels.__file__)) == \
        os.path.realpath(KERNELS_FOLDER)
    assert callable(fastexit.kernels.weighted_linear_cross_entropy)


def test_tiny_transformers_model_builds_and_runs_with_repository_root_on_sys_path():
    transformers = pytest.importorskip("transformers")
    import torch
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 61, (2, 7))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 7, 61)
    assert torch.isfinite(out.loss)
