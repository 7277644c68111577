"""The data folder is a setting: ``$REFLECTAGENT_DATA_DIR``, by default ``../shared/data`` beside a source checkout
(as the editable install records it), and otherwise an error that says what to set."""

from pathlib import Path

import pytest

from reflectagent import paths
from reflectagent.errors import ReflectAgentError
from reflectagent.paths import DATA_DIR_ENV, DataDirError, data_dir

ROOT = Path(__file__).resolve().parents[1]


def test_the_variable_names_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataDirError, match=r"\$REFLECTAGENT_DATA_DIR=.*missing is not a folder"):
        data_dir()


def test_a_source_checkout_defaults_to_the_shared_data_beside_it(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    checkout = tmp_path / "main"
    monkeypatch.setattr(paths, "source_checkout", lambda: checkout)
    with pytest.raises(DataDirError, match=r"main has no ../shared/data beside it\): set \$REFLECTAGENT_DATA_DIR"):
        data_dir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert data_dir() == tmp_path / "shared" / "data"


def test_an_ordinary_install_has_no_default_and_says_what_to_set(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(paths, "source_checkout", lambda: None)
    with pytest.raises(ReflectAgentError, match="not a source checkout.*set \\$REFLECTAGENT_DATA_DIR"):
        data_dir()


def test_the_editable_install_records_this_checkout():
    assert paths.source_checkout() == ROOT  # scripts/install.sh installs with `pip install -e`
