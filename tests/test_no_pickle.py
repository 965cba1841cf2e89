"""No pickle anywhere: the package never unpickles a file and never runs a model's own code.

Why a source scan: loading a pickled checkpoint (`torch.load` without
`weights_only=True`, `pickle.load`, `numpy.load(allow_pickle=True)`) or a repo's
`trust_remote_code=True` executes whatever the file's author wrote. Weights go through
safetensors (`families/loading.py`: `use_safetensors=True`, `trust_remote_code=False`);
a folder with only legacy `*.bin` weights is refused with a one-line error, not loaded.
Any future exception must be added to ALLOWED with its reason, next to the line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import vlm_export

PACKAGE = Path(vlm_export.__file__).parent

FORBIDDEN = {
    "torch.load": re.compile(r"\btorch\.load\s*\("),
    "pickle": re.compile(r"\b(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\.(loads?|Unpickler|open)\b|^\s*(import|from)\s+(c?pickle|dill|cloudpickle|shelve|marshal)\b"),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*(True|1)\b"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "use_safetensors=False": re.compile(r"use_safetensors\s*=\s*False"),
    "yaml.load": re.compile(r"\byaml\.(unsafe_)?load\s*\("),
}

# "relative/path.py:pattern name" → why it is safe. Empty: nothing is exempt today.
ALLOWED: dict[str, str] = {}


def _findings() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for name, pattern in FORBIDDEN.items():
                if pattern.search(code) and f"{rel}:{name}" not in ALLOWED:
                    found.append(f"{rel}:{number}: {name}: {line.strip()}")
    return found


def test_no_unpickling_or_remote_code_in_the_package() -> None:
    assert _findings() == []


def test_the_scan_would_catch_them(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The patterns match the real spellings (a scan that finds nothing must be able to)."""
    samples = ["state = torch.load(path)", "import pickle", "obj = pickle.loads(blob)",
               "m = AutoModel.from_pretrained(d, trust_remote_code=True)", "torch.load(p, weights_only=False)",
               "np.load(p, allow_pickle=True)", "cfg = yaml.load(fh)", "from cloudpickle import loads"]
    fake = tmp_path / "vlm_export"
    fake.mkdir()
    (fake / "bad.py").write_text("\n".join(samples) + "\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    lines_hit = {int(hit.split(":")[1]) for hit in _findings()}
    assert lines_hit == set(range(1, len(samples) + 1)), _findings()


def test_model_loading_is_safetensors_only() -> None:
    source = (PACKAGE / "families" / "loading.py").read_text()
    assert "use_safetensors=True" in source and "trust_remote_code=False" in source and "local_files_only=True" in source
