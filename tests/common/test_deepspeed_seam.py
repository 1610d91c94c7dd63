"""DeepSpeed is touched in two modules only (docs/ARCHITECTURE.md): ``pretrain/engine.py`` trains with it and
``common/deepspeed_checkpoint.py`` reads its checkpoints (for resuming and for ``deepspeed:DIR`` inits)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "synth", "pretrain", "finetune", "experiment")
SEAM = {"pretrain/engine.py", "common/deepspeed_checkpoint.py"}


def _imports_deepspeed(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "deepspeed" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deepspeed" and not node.level:
            return True
    return False


def test_only_the_seam_imports_deepspeed():
    found = {
        str(path.relative_to(REPO))
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if _imports_deepspeed(path)
    }
    assert found == SEAM
