"""The offline Kaggle notebook, executed headless against a Kaggle-like folder with the network blocked."""
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml
from nbclient import NotebookClient

from common.metric import validate_submission
from stage1_seg.boxes import write_box_offsets
from tests.tiny_models import write_tiny_dataset, write_tiny_models

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "submissions"))
from build_kaggle_datasets import build_project_wheel, copy_models  # noqa: E402

# Imported by every Python process started with this folder on PYTHONPATH (the kernel, pip):
# any connection that is not to this machine fails, as on Kaggle with internet off.
BLOCKER = '''
import ipaddress, os, socket
_connect = socket.socket.connect
def _guarded(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            local = ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = host == "localhost"
        if not local:
            raise OSError(f"network blocked in this test: {address}")
    return _connect(self, address)
socket.socket.connect = _guarded
with open(os.environ["NETBLOCK_MARKER"], "a") as _marker:  # proves which processes ran blocked
    _marker.write(f"{os.getpid()}\\n")
'''


@pytest.mark.slow
def test_notebook_writes_a_valid_submission_offline(tmp_path, monkeypatch):
    kaggle = tmp_path / "kaggle"
    data = kaggle / "input" / "rsna-2022-cervical-spine-fracture-detection"
    write_tiny_dataset(data)
    work = tmp_path / "work"
    write_tiny_models(work)
    models = kaggle / "input" / "rsna-csfd-models"
    write_box_offsets(work / "stage1" / "tiny" / "box_offsets.json", np.full((7, 2), 0.5), studies=5)
    copied = copy_models(work, models, "tiny", "tiny")
    assert copied["stage1"] == ["stage1/tiny/fold0/best.pt", "stage1/tiny/box_offsets.json"]
    assert yaml.safe_load((models / "submission.yaml").read_text())["stage2_checkpoints"] == "stage2/tiny/fold*/best.pt"
    wheels = kaggle / "input" / "rsna-csfd-wheels"
    assert build_project_wheel(wheels).name.startswith("rsna_csfd-")

    blocker = tmp_path / "netblock"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    out = kaggle / "working" / "submission.csv"
    out.parent.mkdir(parents=True)
    monkeypatch.setenv("PYTHONPATH", f"{blocker}:{ROOT}")
    marker = tmp_path / "netblock_pids.txt"
    monkeypatch.setenv("NETBLOCK_MARKER", str(marker))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("CSFD_DATA_DIR", str(data))
    monkeypatch.setenv("CSFD_WHEELS_DIR", str(wheels))
    monkeypatch.setenv("CSFD_MODELS_DIR", str(models))
    monkeypatch.setenv("CSFD_OUT", str(out))

    notebook = nbformat.read(ROOT / "submissions" / "rsna_csfd_submission.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    test = pd.read_csv(data / "test.csv", dtype=str)
    submission = pd.read_csv(out, dtype={"row_id": str})
    validate_submission(submission, test["row_id"])
    assert list(submission["row_id"]) == list(test["row_id"])
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # The kernel and the pip it started ran with the network blocked.
    assert len(set(marker.read_text().split())) >= 2
