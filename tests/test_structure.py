"""The package's import contract: stages do not import each other sideways, and only the
model/training code imports TensorFlow or Keras."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "cxr_worker"

# stage -> cxr_worker modules it may import
STAGES = {
    # sizes: the [limits] checks and bounded inflation both stages apply (imports no stage)
    "receive": {"errors", "listener", "sizes", "spool", "worklist"},  # listener: the transport
    "gate": {"errors", "labels", "text"},  # text: escaping quoted values
    "decode": {"errors", "model", "sizes"},
    "sizes": {"errors"},
    "score": {"errors", "model", "labels"},
    "report": {"labels"},
    "report_sr": {"labels", "report"},  # report: ReportConfig, the character set rule
    "hl7v2": {"errors", "labels"},  # the HL7 result: builds and sends (like report + send)
    "send": {"errors"},
    "spool": {"errors"},
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_stages_do_not_import_each_other_sideways():
    for stage, allowed in STAGES.items():
        used = {m.split(".")[1] for m in _imports(PKG / f"{stage}.py")
                if m.startswith("cxr_worker.") and not m.endswith("__version__")}
        assert used <= allowed, f"{stage} imports {sorted(used - allowed)}"


def test_tensorflow_only_in_model_and_training_code():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("training/") or rel == "model/architecture.py":
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] in ("tensorflow", "keras")}
        assert not bad, f"{rel} imports {bad}"


def test_service_modules_do_not_load_tensorflow():
    code = ("import sys, cxr_worker.service, cxr_worker.cli, cxr_worker.pipeline;"
            "from cxr_worker.score import Scorer; Scorer().warm_up();"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "False False"
