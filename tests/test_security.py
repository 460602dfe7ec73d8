"""The source tree loads no code from data: no pickle, torch.load only with weights_only=True, no
trust_remote_code, YAML safe-loaded, no shell on user strings. Read from the syntax tree of every
Python file under saefeatures/, scripts/ and train/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ("saefeatures", "scripts", "train")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}


def _dotted(node: ast.AST) -> str:
    """'torch.load' for torch.load, 'yaml.load' for yaml.load; '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def problems(source: str, where: str = "<src>") -> list[str]:
    """Every unsafe pattern in a Python source, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{line}: imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in UNSAFE_MODULES:
                found.append(f"{line}: imports from {node.module}")
            if module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{line}: imports torch.load by name (call torch.load with weights_only=True)")
            unsafe_yaml = ("load", "unsafe_load", "full_load", "load_all")
            if module == "yaml" and any(a.name in unsafe_yaml for a in node.names):
                found.append(f"{line}: imports an unsafe yaml loader")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
                found.append(f"{line}: torch.load without weights_only=True")
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                found.append(f"{line}: {name}")
            if name == "yaml.load":
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                    found.append(f"{line}: yaml.load without SafeLoader (use yaml.safe_load)")
            trust = _kw(node, "trust_remote_code")
            if trust is not None and not _is_const(trust, False):
                found.append(f"{line}: trust_remote_code not False")
            shell = _kw(node, "shell")
            if shell is not None and not _is_const(shell, False):
                found.append(f"{line}: shell=True")
            pickled = _kw(node, "allow_pickle")
            if pickled is not None and not _is_const(pickled, False):
                found.append(f"{line}: allow_pickle not False")
            if name in ("os.system", "os.popen", "eval", "exec", "pandas.read_pickle", "pd.read_pickle"):
                found.append(f"{line}: {name}()")
    return found


def sources() -> list[Path]:
    return sorted(p for tree in TREES for p in (ROOT / tree).rglob("*.py"))


def test_the_tree_is_there():
    names = {p.relative_to(ROOT).parts[0] for p in sources()}
    assert names == set(TREES), names


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_loading_or_shell(path):
    assert problems(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "from joblib import load",
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "from torch import load",
    "import yaml\nyaml.load(open('c.yaml'))",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.full_load(text)",
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)",
    "import subprocess\nsubprocess.run(cmd, shell=True)",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import os\nos.system('ls ' + name)",
    "eval(user_text)",
])
def test_the_checker_catches_each_pattern(snippet):
    assert problems(snippet)


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.pt', weights_only=True, map_location='cpu')",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import subprocess\nsubprocess.run([sys.executable, 'x.py'], check=True)",
    "model.eval()",
])
def test_the_checker_allows_the_safe_forms(snippet):
    assert problems(snippet) == []
