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
                "network_timeout_seconds", "acse_timeout_seconds", "dimse_timeout_seconds",
                "tls_certificate", "tls_private_key", "tls_ca_certificates",
                "tls_require_client_certificate", "tls", "tls_verify_hostname",
                "max_dataset_bytes", "max_decoded_bytes", "max_inflated_bytes"):
        assert f"{key} =" in text or f"# {key} =" in text, key


def test_every_key_is_documented_in_its_section_of_the_deploy_example():
    import dataclasses
    import re

    sections: dict[str, str] = {}
    current = None
    for line in (REPO / "deploy" / "cxr-worker.toml").read_text().splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            current = m.group(1)
            sections[current] = ""
        elif current:
            sections[current] += line + "\n"
    defaults = load_settings(None, environ={})
    missing = [f"{section.name}.{key.name}"
               for section in dataclasses.fields(defaults)
               for key in dataclasses.fields(getattr(defaults, section.name))
               if not re.search(rf"^(# )?{key.name} =", sections.get(section.name, ""), re.M)]
    assert not missing, f"not in deploy/cxr-worker.toml: {missing}"


def test_shutdown_and_sweep_defaults_are_safe():
    s = load_settings(REPO / "deploy" / "cxr-worker.toml", environ={})
    assert s.jobs.orphan_grace_seconds == 3600.0  # a store in progress is never swept
    assert 0 < s.jobs.shutdown_grace_seconds <= 3.0  # SIGTERM: gone within 5 s
    assert s.pacs.connect_timeout_seconds == 5.0 and s.pacs.timeout_seconds == 30.0


def test_outputs_are_delivered_where_they_have_a_destination():
    s = load_settings(None, environ={})
    assert s.outputs.kinds == ["sc"] and s.delivered_kinds == ()  # no PACS: results stay
    s = load_settings(None, environ={"CXR_WORKER__PACS__AE_TITLE": "PACS"})
    assert s.delivered_kinds == ("sc",)  # an existing site: unchanged
    s = load_settings(None, environ={"CXR_WORKER__OUTPUTS__KINDS": "hl7,sr",
                                     "CXR_WORKER__HL7__HOST": "ris.example.org"})
    assert s.delivered_kinds == ("hl7",)  # no PACS: no SR
    from cxr_worker.settings import hl7_config

    cfg = hl7_config(load_settings(None, environ={
        "CXR_WORKER__HL7__HOST": "ris", "CXR_WORKER__HL7__PRIORITY_SUSPECTED": "A",
        "CXR_WORKER__HL7__PATIENT_FIELDS": "name,sex"}))
    assert (cfg.host, cfg.port, cfg.patient_fields) == ("ris", 2575, ("name", "sex"))
    assert cfg.priorities == {"SUSPECTED PNEUMONIA": "A", "NO PNEUMONIA DETECTED": "R"}


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
        ("", {"CXR_WORKER__LISTENER__MAX_ASSOCIATIONS_PER_HOST": "0"},
         "listener.max_associations_per_host"),
        ('[listener]\ncheck_called_ae_title = "no"\n', {}, "listener.check_called_ae_title"),
        ("", {"CXR_WORKER__LISTENER__NETWORK_TIMEOUT_SECONDS": "0"},
         "listener.network_timeout_seconds"),
        ('[listener]\nacse_timeout_seconds = -1\n', {}, "listener.acse_timeout_seconds"),
        ('[listener]\ndimse_timeout_seconds = "x"\n', {}, "listener.dimse_timeout_seconds"),
        ("", {"CXR_WORKER__LOGGING__FORMAT": "JSON "}, "logging.format"),
        ('[limits]\nmax_dataset_bytes = 1000\n', {}, "limits.max_dataset_bytes"),
        ("", {"CXR_WORKER__LIMITS__MAX_DECODED_BYTES": "2147483649"},
         "limits.max_decoded_bytes"),
        ('[limits]\nmax_inflated_bytes = 8.5e7\n', {}, "limits.max_inflated_bytes"),
        ('[listener]\ntls_certificate = "/c.pem"\n', {}, "listener.tls_private_key"),
        ('[listener]\ntls_private_key = "/k.pem"\n', {}, "listener.tls_certificate"),
        ('[listener]\ntls_certificate = "/c.pem"\ntls_private_key = "/k.pem"\n', {},
         "listener.tls_ca_certificates"),
        ('[listener]\ntls_ca_certificates = "/ca.pem"\n', {}, "listener.tls_ca_certificates"),
        ("", {"CXR_WORKER__LISTENER__TLS_REQUIRE_CLIENT_CERTIFICATE": "maybe"},
         "listener.tls_require_client_certificate"),
        ('[pacs]\ntls_ca_certificates = "/ca.pem"\n', {}, "pacs.tls_ca_certificates"),
        ('[pacs]\ntls = true\ntls_private_key = "/k.pem"\n', {}, "pacs.tls_certificate"),
        ('[pacs]\ntls = "yes"\n', {}, "pacs.tls"),
        ('[pacs]\nconnect_timeout_seconds = 0\n', {}, "pacs.connect_timeout_seconds"),
        ("", {"CXR_WORKER__PACS__TIMEOUT_SECONDS": "-1"}, "pacs.timeout_seconds"),
        ('[jobs]\norphan_grace_seconds = 59\n', {}, "jobs.orphan_grace_seconds"),
        ('[jobs]\nshutdown_grace_seconds = 0\n', {}, "jobs.shutdown_grace_seconds"),
        ("", {"CXR_WORKER__JOBS__SHUTDOWN_GRACE_SECONDS": "61"}, "jobs.shutdown_grace_seconds"),
        ('[outputs]\nkinds = ["sc", "pdf"]\n', {}, "outputs.kinds"),
        ('[outputs]\nkinds = []\n', {}, "outputs.kinds"),
        ("", {"CXR_WORKER__OUTPUTS__KINDS": "sc,sc"}, "outputs.kinds"),
        ("", {"CXR_WORKER__OUTPUTS__KINDS": "sc,hl7"}, "hl7.host"),
        ('[hl7]\nport = 0\n', {}, "hl7.port"),
        ('[hl7]\npatient_fields = ["address"]\n', {}, "hl7.patient_fields"),
        ("", {"CXR_WORKER__HL7__PRIORITY_FIELDS": "OBR-27,PV1-2"}, "hl7.priority_fields"),
        ('[hl7]\npriority_suspected = ""\n', {}, "hl7.priority_suspected"),
        ("", {"CXR_WORKER__HL7__TIMEOUT_SECONDS": "0"}, "hl7.timeout_seconds"),
    ],
)
def test_invalid_settings_name_the_key(tmp_path, toml, env, key):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg, environ=env)
    assert key in str(exc.value)


def test_tls_settings_that_fit_together_load():
    s = load_settings(None, environ={
        "CXR_WORKER__LISTENER__TLS_CERTIFICATE": "/c.pem",
        "CXR_WORKER__LISTENER__TLS_PRIVATE_KEY": "/k.pem",
        "CXR_WORKER__LISTENER__TLS_REQUIRE_CLIENT_CERTIFICATE": "false",
        "CXR_WORKER__PACS__TLS": "true"})
    assert s.listener.tls_certificate == "/c.pem" and not s.listener.tls_ca_certificates
    assert s.pacs.tls and s.pacs.tls_verify_hostname and not s.pacs.tls_ca_certificates
    defaults = load_settings(None, environ={})
    assert not defaults.listener.tls_certificate and not defaults.pacs.tls
    assert defaults.listener.tls_require_client_certificate


def test_invalid_toml_is_reported(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[listener\nport=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg, environ={})


def test_unreadable_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings(tmp_path, environ={})  # a folder, not a file


def test_limits_defaults_equal_the_decoders():
    """``[limits]``'s defaults are the ones :mod:`cxr_worker.decode` uses when no settings
    were given (``score`` of a file, a test), and the service passes them through."""
    from cxr_worker import compose, sizes

    s = load_settings(None, environ={})
    assert compose.size_limits(s) == sizes.Limits()
    site = load_settings(None, environ={"CXR_WORKER__LIMITS__MAX_DECODED_BYTES": "2097152"})
    assert compose.size_limits(site).max_decoded_bytes == 2097152
