"""notebooks/quickstart.ipynb runs from top to bottom (its code cells, in one namespace, as a
kernel would run them)."""

import json
import re
from pathlib import Path

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(capsys):
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)
    printed = capsys.readouterr().out
    assert set(namespace["rows"]) == {"full", "kivi2", "k8v4", "snapkv", "minikv",
                                      "kvsharer1+minikv"}
    stats = namespace["rows"]
    assert stats["minikv"].cache_bytes < stats["kivi2"].cache_bytes < stats["full"].cache_bytes
    assert len(namespace["agnostic"].tokens) == 2
    assert "the passkey is" in printed
    # The bundled model retrieves: every answer printed with a score scores 1.
    scores = re.findall(r"score (\d)", printed)
    assert len(scores) == 5 + 2 + 1 and set(scores) == {"1"}, printed
