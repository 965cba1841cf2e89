"""No pickle anywhere: the package never unpickles a file and never runs a model's own code.

Why a source scan: loading a pickled checkpoint (`torch.load`, `pickle.load`,
`numpy.load(allow_pickle=True)`) or a repo's `trust_remote_code=True` executes whatever
the file's author wrote. Weights go through safetensors (`families/loading.py`:
`use_safetensors=True`, `trust_remote_code=False`); a folder with only legacy `*.bin`
weights is refused with a one-line error, not loaded.

Why an AST scan and not a text search: `import torch as t; t.load(p)`,
`from numpy import load as read; read(p, allow_pickle=True)` or `loader = torch.load`
spell the same call differently. The scan resolves every call's target through the
module's imports and simple assignments, so a renamed import does not hide it; comments
and strings that merely mention `torch.load(` are not calls and are not reported.
Any future exception must be added to ALLOWED with its reason, next to the line.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import vlm_export

PACKAGE = Path(vlm_export.__file__).parent

# Modules whose loaders unpickle (or run marshalled code): importing them at all is refused.
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "pickletools"}
# Calls refused whatever their arguments.
FORBIDDEN_CALLS = {"torch.load", "torch.serialization.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load"}
# Keyword arguments refused when given this literal value (any call).
FORBIDDEN_KEYWORDS = {"trust_remote_code": True, "weights_only": False, "use_safetensors": False, "allow_pickle": True}
IMPORTERS = {"importlib.import_module", "__import__"}

# "relative/path.py:rule" → why it is safe. Empty: nothing is exempt today.
ALLOWED: dict[str, str] = {}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The fully qualified name an expression refers to, through the module's aliases."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _aliases(tree: ast.AST) -> dict[str, str]:
    """local name → qualified name, from imports and `name = dotted.name` assignments
    anywhere in the module (scope-insensitive on purpose: a wider net)."""
    aliases: dict[str, str] = {}
    for _ in range(8):  # assignments may chain (a = torch; b = a.load); a few rounds settle them
        changed = False
        for node in ast.walk(tree):
            pairs: list[tuple[str, str]] = []
            if isinstance(node, ast.Import):
                pairs = [(a.asname or a.name.split(".")[0], a.name if a.asname else a.name.split(".")[0]) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                pairs = [(a.asname or a.name, f"{node.module}.{a.name}") for a in node.names if a.name != "*"]
            elif isinstance(node, ast.Assign) and isinstance(node.value, (ast.Name, ast.Attribute)):
                target = _dotted(node.value, aliases)
                pairs = [(t.id, target) for t in node.targets
                         if isinstance(t, ast.Name) and target and target.split(".")[0] != t.id]
            for local, qualified in pairs:
                if aliases.get(local) != qualified:
                    aliases[local] = qualified
                    changed = True
        if not changed:
            break
    return aliases


def _truthy(value: ast.AST, wanted: bool) -> bool:
    return isinstance(value, ast.Constant) and bool(value.value) is wanted and isinstance(value.value, (bool, int))


def scan_source(source: str) -> list[tuple[int, str]]:
    """(line, rule) for every offending import, call or keyword in `source`."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PICKLE_MODULES:
            found.append((node.lineno, f"import {node.module}"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func, aliases) or ""
            root = name.split(".")[0]
            if name in FORBIDDEN_CALLS:
                found.append((node.lineno, name))
            elif root in PICKLE_MODULES and name != root:
                found.append((node.lineno, name))
            elif name in IMPORTERS and node.args and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).split(".")[0] in PICKLE_MODULES | {"torch", "yaml"}:
                found.append((node.lineno, f"{name}({node.args[0].value!r})"))
            for keyword in node.keywords:
                if keyword.arg in FORBIDDEN_KEYWORDS and _truthy(keyword.value, FORBIDDEN_KEYWORDS[keyword.arg]):
                    found.append((node.lineno, f"{keyword.arg}={FORBIDDEN_KEYWORDS[keyword.arg]}"))
    return sorted(set(found))


def _findings() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, rule in scan_source(path.read_text(encoding="utf-8")):
            if f"{rel}:{rule}" not in ALLOWED:
                found.append(f"{rel}:{line}: {rule}")
    return found


def test_no_unpickling_or_remote_code_in_the_package() -> None:
    assert sum(1 for _ in PACKAGE.rglob("*.py")) > 50  # the scan really walks the package
    assert _findings() == []


OFFENDING = {
    "plain torch.load": ("import torch\nstate = torch.load(path)\n", [(2, "torch.load")]),
    "renamed torch": ("import torch as tt\nstate = tt.load(path)\n", [(2, "torch.load")]),
    "from-import renamed": ("from torch import load as read_weights\nstate = read_weights(path)\n", [(2, "torch.load")]),
    "assigned alias": ("import torch\nloader = torch.load\nx = loader(path)\n", [(3, "torch.load")]),
    "torch.serialization": ("import torch.serialization\ntorch.serialization.load(p)\n", [(2, "torch.serialization.load")]),
    "numpy allow_pickle": ("import numpy as xp\nxp.load(p, allow_pickle=True)\n", [(2, "allow_pickle=True")]),
    "numpy from-import": ("from numpy import load as L\nL(p, allow_pickle=1)\n", [(2, "allow_pickle=True")]),
    "import pickle": ("import pickle\n", [(1, "import pickle")]),
    "pickle renamed": ("import pickle as jsonish\nobj = jsonish.loads(blob)\n",
                       [(1, "import pickle"), (2, "pickle.loads")]),
    "from cloudpickle": ("from cloudpickle import loads\n", [(1, "import cloudpickle")]),
    "dynamic import": ("import importlib\nm = importlib.import_module('pickle')\n", [(2, "importlib.import_module('pickle')")]),
    "remote code": ("m = AutoModel.from_pretrained(d, trust_remote_code=True)\n", [(1, "trust_remote_code=True")]),
    "weights_only=False": ("import safe\nsafe.read(p, weights_only=False)\n", [(2, "weights_only=False")]),
    "use_safetensors=False": ("M.from_pretrained(d, use_safetensors=False)\n", [(1, "use_safetensors=False")]),
    "yaml.load": ("import yaml as y\ncfg = y.load(fh)\n", [(2, "yaml.load")]),
    "inside a function": ("def f(p):\n    import torch as t\n    return t.load(p)\n", [(3, "torch.load")]),
}

CLEAN = {
    "numpy default": "import numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False)\n",
    "json": "import json\njson.load(fh)\n",
    "safetensors": "from safetensors.torch import load_file\nload_file(p)\n",
    "mentions only": "# torch.load(path) is never called\ndoc = 'pickle.loads(x) and torch.load(p)'\n",
    "safe flags": "M.from_pretrained(d, trust_remote_code=False, use_safetensors=True, local_files_only=True)\n",
}


@pytest.mark.parametrize("name", sorted(OFFENDING))
def test_the_scan_catches_each_spelling(name: str) -> None:
    source, expected = OFFENDING[name]
    assert scan_source(source) == expected


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_the_scan_leaves_safe_code_alone(name: str) -> None:
    assert scan_source(CLEAN[name]) == []


def test_the_scan_reports_an_injected_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package copy with one offending module: the package-level scan names that file and line."""
    fake = tmp_path / "vlm_export"
    (fake / "sub").mkdir(parents=True)
    (fake / "ok.py").write_text(CLEAN["numpy default"])
    (fake / "sub" / "bad.py").write_text('"""weights"""\nimport torch as backend\n\ndef read(p):\n    return backend.load(p)\n')
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _findings() == ["sub/bad.py:5: torch.load"]


def test_model_loading_is_safetensors_only() -> None:
    tree = ast.parse((PACKAGE / "families" / "loading.py").read_text())
    keywords = {(k.arg, k.value.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                for k in node.keywords if isinstance(k.value, ast.Constant)}
    assert {("use_safetensors", True), ("trust_remote_code", False), ("local_files_only", True)} <= keywords
