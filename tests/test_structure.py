"""The package's import contract: every module is placed in a layer and imports only what its
layer may; stages do not import each other sideways; only the model/training code imports
TensorFlow or Keras, and every other module imports without it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "cxr_worker"

# stage -> cxr_worker modules it may import (top-level names: "model", "worklist" are packages)
STAGES = {
    # sizes: the [limits] checks and bounded inflation both stages apply (imports no stage)
    "receive": {"errors", "listener", "sizes", "sop_classes", "spool", "worklist"},
    "listener": {"text"},  # receive's transport: associations admitted, bounded, logged
    "gate": {"errors", "labels", "sop_classes", "text"},  # text: escaping quoted values
    "decode": {"errors", "model", "sizes"},
    "sizes": {"errors"},
    # decode: the scorer owns preprocessing, from the data set (Scorer.score_dataset)
    "score": {"decode", "errors", "model", "labels"},
    "report": {"labels", "sop_classes"},
    "report_sr": {"labels", "report", "sop_classes"},  # report: ReportConfig, the character set
    "hl7v2": {"errors", "labels"},  # the HL7 result: builds and sends (like report + send)
    "send": {"errors"},
    "spool": {"errors"},
}

# every module of the package (by import name, without "cxr_worker."; "" is the package
# itself) in one layer; a new module fails test_every_module_is_placed until it is put in one
LAYERS: dict[str, set[str]] = {
    # common words and helpers: import no other layer
    "common": {"", "errors", "labels", "text", "logs", "sop_classes", "inputs", "heap"},
    # the model's files, preprocessing contract and runtime (LiteRT, NumPy)
    "model": {"model", "model.architecture", "model.calibration", "model.card",
              "model.heatmap", "model.metrics", "model.preprocess", "model.runtime"},
    "stage": set(STAGES),
    "worklist": {"worklist", "worklist.control", "worklist.deliveries", "worklist.header",
                 "worklist.models", "worklist.queue", "worklist.reasons", "worklist.schema",
                 "worklist.site", "worklist.studies", "worklist.tokens"},
    "settings": {"settings", "tls"},
    # what runs the stages and serves the worklist (given their configs, never Settings'
    # builders)
    "runtime": {"assess", "pipeline", "processing", "workers", "jobs", "metrics", "health",
                "http", "lifecycle", "web", "web.api", "web.auth", "web.events", "web.images",
                "web.openapi"},
    # the wiring: stage configs, the scorer, the worklist and the pipeline from Settings
    "wiring": {"compose"},
    # the running processes: ``serve`` and ``web`` (each starts the other's HTTP side)
    "root": {"service", "web.app"},
    "commands": {"cli", "replay", "calibrate", "conformance", "doctor", "stats"},
    "training": {"training", "training.augment", "training.data", "training.evaluate",
                 "training.finalize", "training.gradcam", "training.robustness",
                 "training.train", "training.verify"},
}
_BELOW_WIRING = {"common", "model", "stage", "worklist", "settings", "runtime"}
# layer -> the layers (or single modules) its modules may import
MAY_IMPORT: dict[str, set[str]] = {
    "common": {"common"},
    "model": {"common", "model"},
    "stage": {"common", "model", "stage", "worklist"},  # and each stage only its STAGES entry
    # gate: the rules' names (reasons); spool: what a valid UID is (header)
    "worklist": {"common", "worklist", "gate", "spool"},
    "settings": {"common", "settings", "hl7v2", "send"},  # [hl7]'s builder; the PACS peer
    "runtime": _BELOW_WIRING,
    "wiring": _BELOW_WIRING,
    "root": _BELOW_WIRING | {"wiring", "root"},
    "commands": _BELOW_WIRING | {"wiring", "root", "commands", "training"},
    "training": {"common", "model", "training", "score"},
}
# not modules: alembic's scripts, run by alembic (cxr_worker.worklist.schema)
NOT_MODULES = ("worklist/migrations/",)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _modules() -> dict[str, Path]:
    """Every module of the package by import name (without "cxr_worker."; "" the package)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith(NOT_MODULES):
            continue
        name = rel.removesuffix(".py").replace("/", ".")
        out["" if name == "__init__" else name.removesuffix(".__init__")] = path
    return out


def _layer(module: str) -> str:
    (layer,) = [name for name, members in LAYERS.items() if module in members]
    return layer


def _package_imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules ``path`` imports (``from cxr_worker.x import y``: x, and x.y when
    y is a module), wherever the import stands (a function's lazy import counts too)."""
    out = set()
    for m in _imports(path):
        if m != "cxr_worker" and not m.startswith("cxr_worker."):
            continue
        parts = m.split(".")[1:]
        named = [".".join(parts[:k]) for k in range(len(parts), 0, -1)]
        out.add(next((n for n in named if n in modules), ""))
    return out


def test_every_module_is_placed_in_one_layer():
    modules = set(_modules())
    placed = [m for members in LAYERS.values() for m in members]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert modules - set(placed) == set(), "put each new module in a layer of LAYERS"
    assert set(placed) - modules == set(), "LAYERS names a module that is gone"
    assert set(MAY_IMPORT) == set(LAYERS)


def test_each_module_imports_only_what_its_layer_may():
    modules = _modules()
    for name, path in modules.items():
        layer = _layer(name)
        may = MAY_IMPORT[layer]
        bad = {m for m in _package_imports(path, set(modules)) - {name}
               if _layer(m) not in may and m not in may and m.split(".")[0] not in may}
        assert not bad, f"{name or 'cxr_worker'} ({layer}) imports {sorted(bad)}"


def test_stages_do_not_import_each_other_sideways():
    for stage, allowed in STAGES.items():
        used = {m.split(".")[1] for m in _imports(PKG / f"{stage}.py")
                if m.startswith("cxr_worker.") and not m.endswith("__version__")}
        assert used <= allowed, f"{stage} imports {sorted(used - allowed)}"


def test_the_contract_fails_a_sideways_import(tmp_path: Path):
    """The check is real: a stage that imported another stage would be caught."""
    decode_src = (PKG / "decode.py").read_text()
    sideways = tmp_path / "decode.py"
    sideways.write_text(decode_src + "\n\ndef _late():\n    from cxr_worker import report\n")
    used = {m.split(".")[1] for m in _imports(sideways) if m.startswith("cxr_worker.")}
    assert "report" in used and not used <= STAGES["decode"]
    assert _layer("report") not in MAY_IMPORT["common"]


def test_tensorflow_only_in_model_and_training_code():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("training/") or rel == "model/architecture.py":
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] in ("tensorflow", "keras")}
        assert not bad, f"{rel} imports {bad}"


def test_every_module_imports_without_tensorflow():
    """Every module but the training code (and the Keras architecture) imports, and the scorer
    scores, with TensorFlow and Keras made unimportable."""
    names = [f"cxr_worker.{m}" if m else "cxr_worker" for m in _modules()
             if _layer(m) != "training" and m != "model.architecture"]
    code = ("import importlib, sys\n"
            "sys.modules.update(tensorflow=None, keras=None, tf_keras=None)\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "from cxr_worker.score import Scorer\n"
            "Scorer().warm_up()\n"
            "print(len([m for m in sys.modules if m.startswith(('tensorflow.', 'keras.'))]))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "0"
