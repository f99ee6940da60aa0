"""Shared pytest fixtures. Each group is marked with what it serves."""
from __future__ import annotations

from pathlib import Path

import pytest

TEST_DATA = Path(__file__).resolve().parent / "data"


# --- Network: no test downloads weights ------------------------------------------------

@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """Every test, and every process it starts, sees the Hugging Face hub as offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --- Real CT series (DICOM reader and NIfTI reader tests) -----------------------------

REAL_CT = TEST_DATA / "totalsegmentator_example_ct"

# name -> transfer syntax UID of the copies made by ``real_ct_transcoded``
REAL_CT_SYNTAXES = {
    "explicit-le": "1.2.840.10008.1.2.1",
    "implicit-le": "1.2.840.10008.1.2",
    "jpeg-lossless-70": "1.2.840.10008.1.2.4.70",
    "jpeg-lossless-57": "1.2.840.10008.1.2.4.57",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg2000-91": "1.2.840.10008.1.2.4.91",
}


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """The real 20-slice JPEG 2000 CT series carried in tests/data."""
    folder = REAL_CT / "dicom"
    assert folder.is_dir(), f"real CT series missing from the checkout: {folder}"
    return folder


@pytest.fixture(scope="session")
def real_ct_study(real_ct_dir: Path):
    from common.dicom import load_study

    return load_study(real_ct_dir)


@pytest.fixture(scope="session")
def real_ct_transcoded(real_ct_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Four real slices re-encoded losslessly into each of REAL_CT_SYNTAXES.

    The source files carry empty SOP Class / Instance UIDs, which gdcm refuses to
    write, so those are filled in first (pixel data untouched).
    """
    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    from tooling.dicom_writer import transcode_file

    root = tmp_path_factory.mktemp("real_ct_transcoded")
    fixed = root / "source"
    fixed.mkdir()
    series_uid = generate_uid()
    for path in sorted(real_ct_dir.iterdir())[:4]:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = ds.SeriesInstanceUID or series_uid
        ds.save_as(fixed / path.name)
    folders = {}
    for name, syntax in REAL_CT_SYNTAXES.items():
        folders[name] = root / name
        folders[name].mkdir()
        for path in sorted(fixed.iterdir()):
            transcode_file(path, folders[name] / path.name, syntax)
    return folders


# --- Bad-input catalogue: its table at the end of the session --------------------------

def pytest_terminal_summary(terminalreporter):
    """Print ``component | input | outcome`` for every catalogue case that ran (none: nothing)."""
    import sys

    # Found among the imported modules, so a session without the catalogue never imports it.
    module = next((m for name, m in list(sys.modules.items()) if name.endswith("test_bad_input_catalogue")), None)
    rows = getattr(module, "CATALOGUE", None)
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    terminalreporter.section(f"bad input catalogue: {len(rows)} cases")
    for component, given, outcome in rows:
        terminalreporter.write_line(f"{component:<{widths[0]}} | {given:<{widths[1]}} | {outcome}")
