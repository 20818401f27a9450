"""Settings: TOML file, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_worker.errors import ConfigError
from cxr_worker.settings import load_settings

REPO = Path(__file__).resolve().parent.parent


def test_defaults_need_no_file():
    s = load_settings(None, environ={})
    assert (s.listener.ae_title, s.listener.host, s.listener.port) == \
        ("CXR_WORKER", "127.0.0.1", 11112)
    assert not s.pacs_configured
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("worklist.db")
    assert s.model.threshold is None


def test_deploy_example_is_valid_and_complete():
    s = load_settings(REPO / "deploy" / "cxr-worker.toml", environ={})
    assert s.listener.port == 11112
    text = (REPO / "deploy" / "cxr-worker.toml").read_text()
    assert s.logging.format == "text"
    for key in ("ae_title", "host", "port", "allowed_calling_ae_titles", "url", "data_dir",
                "path", "threshold", "format", "max_pdu_bytes", "max_associations",
                "network_timeout_seconds", "acse_timeout_seconds", "dimse_timeout_seconds"):
        assert f"{key} =" in text or f"# {key} =" in text, key


def test_file_then_environment(tmp_path):
    cfg = tmp_path / "w.toml"
    cfg.write_text('[listener]\nport = 4000\nallowed_calling_ae_titles = ["CR1"]\n'
                   '[pacs]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n'
                   '[model]\nthreshold = 0.3\n')
    s = load_settings(cfg, environ={"CXR_WORKER__LISTENER__PORT": "4001",
                                    "CXR_WORKER__LISTENER__ALLOWED_CALLING_AE_TITLES": "A, B",
                                    "CXR_WORKER__MODEL__THRESHOLD": ""})
    assert s.listener.port == 4001
    assert s.listener.allowed_calling_ae_titles == ["A", "B"]
    assert s.pacs_configured and s.pacs.host == "10.0.0.5"
    assert s.model.threshold is None  # empty: the model card's


def test_config_path_from_environment(tmp_path):
    cfg = tmp_path / "w.toml"
    cfg.write_text('[storage]\ndata_dir = "/srv/cxr"\n')
    s = load_settings(None, environ={"CXR_WORKER_CONFIG": str(cfg)})
    assert str(s.data_dir) == "/srv/cxr"


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ('[listener]\nport = "eleven"\n', {}, "listener.port"),
        ('[listener]\nport = 70000\n', {}, "listener.port"),
        ('[listener]\nae_title = "MUCH_TOO_LONG_AE_TITLE"\n', {}, "listener.ae_title"),
        ('[listener]\nportt = 1\n', {}, "listener.portt"),
        ('[lisener]\nport = 1\n', {}, "[lisener]"),
        ('[model]\nthreshold = 1.5\n', {}, "model.threshold"),
        ('[pacs]\nae_title = "PACS"\nhost = ""\n', {}, "pacs.host"),
        ("", {"CXR_WORKER__JOBS__MAX_ATTEMPTS": "many"}, "jobs.max_attempts"),
        ("", {"CXR_WORKER__LISTENER__ACCEPT_DX_FOR_PROCESSING": "perhaps"},
         "listener.accept_dx_for_processing"),
        ("", {"CXR_WORKER__NOPE__X": "1"}, "CXR_WORKER__NOPE__X"),
        ('[report]\nuid_prefix = "1.2.3"\n', {}, "report.uid_prefix"),
        ('[logging]\nformat = "xml"\n', {}, "logging.format"),
        ('[listener]\nmax_pdu_bytes = 1024\n', {}, "listener.max_pdu_bytes"),
        ("", {"CXR_WORKER__LISTENER__MAX_PDU_BYTES": "16777217"}, "listener.max_pdu_bytes"),
        ('[listener]\nmax_associations = 0\n', {}, "listener.max_associations"),
        ("", {"CXR_WORKER__LISTENER__NETWORK_TIMEOUT_SECONDS": "0"},
         "listener.network_timeout_seconds"),
        ('[listener]\nacse_timeout_seconds = -1\n', {}, "listener.acse_timeout_seconds"),
        ('[listener]\ndimse_timeout_seconds = "x"\n', {}, "listener.dimse_timeout_seconds"),
        ("", {"CXR_WORKER__LOGGING__FORMAT": "JSON "}, "logging.format"),
    ],
)
def test_invalid_settings_name_the_key(tmp_path, toml, env, key):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg, environ=env)
    assert key in str(exc.value)


def test_invalid_toml_is_reported(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[listener\nport=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg, environ={})


def test_unreadable_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings(tmp_path, environ={})  # a folder, not a file
