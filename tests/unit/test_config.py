"""The TOML configuration: every error names the file and the key path; secrets stay out."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from engine.config import Config, ConfigError, config_path, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]

LISTENER = '[[mllp.listeners]]\nname = "main"\nport = 2575\n'


def write(tmp_path: Path, text: str, name: str = "engine.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# -- good configs -------------------------------------------------------------------------


def test_shipped_engine_toml_loads() -> None:
    cfg = load_config(REPO / "engine.toml")
    assert [listener.name for listener in cfg.mllp.listeners] == ["default"]
    assert cfg.mllp.listeners[0].port == 2575
    assert cfg.http.port == 8080
    assert cfg.source == REPO / "engine.toml"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.mllp.listeners == ()
    assert cfg.database.url == "sqlite:///var/refloop.db"
    assert cfg.ingest.max_batch == 256


def test_listener_fields_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        LISTENER
        + 'allowed_cidrs = ["10.0.0.0/8", "2001:db8::/32"]\n'
        + 'ack_mode = "enhanced"\n'
        + 'default_charset = "latin-1"\n'
        + 'timezone = "America/Chicago"\n'
        + 'message_types = ["ORM", "SIU"]\n',
    )
    listener = load_config(path).mllp.listeners[0]
    assert listener.ack_mode == "enhanced"
    assert listener.default_charset == "latin-1"
    assert listener.timezone == "America/Chicago"
    assert listener.message_types == ("ORM", "SIU")
    assert listener.networks() == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, LISTENER))
    with pytest.raises(ValidationError):
        cfg.mllp.listeners[0].port = 1  # type: ignore[misc]


# -- bad configs: the message names the file and the exact key path -----------------------

BAD: list[tuple[str, str, str]] = [
    ("missing-port", '[[mllp.listeners]]\nname = "main"\n', "mllp.listeners[0].port"),
    ("port-too-big", '[[mllp.listeners]]\nname = "a"\nport = 70000\n', "mllp.listeners[0].port"),
    ("port-not-int", '[[mllp.listeners]]\nname = "a"\nport = "x"\n', "mllp.listeners[0].port"),
    (
        "second-listener",
        LISTENER + '[[mllp.listeners]]\nname = "b"\nport = -1\n',
        "mllp.listeners[1].port",
    ),
    ("bad-name", '[[mllp.listeners]]\nname = "Main Feed"\nport = 1\n', "mllp.listeners[0].name"),
    ("unknown-listener-key", LISTENER + "colour = 1\n", "mllp.listeners[0].colour"),
    ("unknown-section", "[bogus]\nx = 1\n", "bogus"),
    ("unknown-top-key", "verbose = true\n", "verbose"),
    ("unknown-database-key", '[database]\nhost = "db"\n', "database.host"),
    ("unknown-mllp-key", "[mllp]\nport = 1\n", "mllp.port"),
    ("http-port", "[http]\nport = -1\n", "http.port"),
    ("bad-cidr-prefix", LISTENER + 'allowed_cidrs = ["10.0.0.0/33"]\n', "allowed_cidrs"),
    ("bad-cidr-text", LISTENER + 'allowed_cidrs = ["anywhere"]\n', "allowed_cidrs"),
    ("bad-timezone", LISTENER + 'timezone = "Mars/Olympus"\n', "mllp.listeners[0].timezone"),
    ("timezone-path", LISTENER + 'timezone = "../etc/passwd"\n', "mllp.listeners[0].timezone"),
    ("timezone-empty", LISTENER + 'timezone = ""\n', "mllp.listeners[0].timezone"),
    ("bad-charset", LISTENER + 'default_charset = "klingon"\n', "default_charset"),
    ("binary-codec", LISTENER + 'default_charset = "hex"\n', "default_charset"),
    ("text-transform-codec", LISTENER + 'default_charset = "rot13"\n', "default_charset"),
    ("not-ascii-compatible", LISTENER + 'default_charset = "utf-16"\n', "default_charset"),
    (
        "duplicate-names",
        LISTENER + '[[mllp.listeners]]\nname = "main"\nport = 2576\n',
        "mllp.listeners",
    ),
    ("ack-mode", LISTENER + 'ack_mode = "sometimes"\n', "mllp.listeners[0].ack_mode"),
    ("small-max", LISTENER + "max_message_bytes = 10\n", "mllp.listeners[0].max_message_bytes"),
    ("idle-zero", LISTENER + "idle_timeout_seconds = 0\n", "idle_timeout_seconds"),
    ("lowercase-type", LISTENER + 'message_types = ["orm"]\n', "mllp.listeners[0].message_types"),
    ("tls-missing-key", LISTENER + '[mllp.listeners.tls]\ncert_file = "c.pem"\n', "tls.key_file"),
    (
        "tls-unknown-key",
        LISTENER + '[mllp.listeners.tls]\ncert_file = "c"\nkey_file = "k"\nverify = false\n',
        "mllp.listeners[0].tls.verify",
    ),
    (
        "tls-version",
        LISTENER + '[mllp.listeners.tls]\ncert_file = "c"\nkey_file = "k"\nmin_version = "SSLv3"\n',
        "mllp.listeners[0].tls.min_version",
    ),
    ("log-level", '[logging]\nlevel = "loud"\n', "logging.level"),
    ("log-format", '[logging]\nformat = "xml"\n', "logging.format"),
    ("max-batch", "[ingest]\nmax_batch = 0\n", "ingest.max_batch"),
    ("pool-size", "[database]\npool_size = 0\n", "database.pool_size"),
    ("synchronous", '[database]\nsqlite_synchronous = "OFF"\n', "database.sqlite_synchronous"),
    ("mysql", '[database]\nurl = "mysql://db/refloop"\n', "database.url"),
    ("not-a-url", '[database]\nurl = "refloop database"\n', "database.url"),
    ("inline-secret", '[database.password]\nvalue = "hunter2"\n', "database.password.value"),
    ("top-level-list", "mllp = [1]\n", "mllp"),
]


@pytest.mark.parametrize(("text", "key"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_file_and_key_path(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    lines = message.splitlines()
    assert any(
        line.startswith(f"{path}: ") and line.split(": ")[1].endswith(key) for line in lines
    ), message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[[mllp.listeners]]\nname = "main"\n', "mllp.listeners[0].port"),
        (LISTENER + "colour = 1\n", "mllp.listeners[0].colour"),
        (LISTENER + 'allowed_cidrs = ["10.0.0.0/33"]\n', "mllp.listeners[0].allowed_cidrs"),
        (LISTENER + 'default_charset = "klingon"\n', "mllp.listeners[0].default_charset"),
        ("[http]\nport = -1\n", "http.port"),
        ('[database]\nurl = "mysql://db/refloop"\n', "database.url"),
    ],
)
def test_key_path_is_exact(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    assert config_error(path).startswith(f"{path}: {key}: ")


def test_unknown_keys_are_refused_not_ignored(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, LISTENER + "max_mesage_bytes = 2048\n"))
    assert "mllp.listeners[0].max_mesage_bytes" in message
    assert "Extra inputs are not permitted" in message


def test_every_error_is_reported_on_its_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, LISTENER + 'timezone = "Nowhere"\n[http]\nport = 99999\n')
    lines = config_error(path).splitlines()
    assert len(lines) == 2
    assert {line.split(": ")[1] for line in lines} == {"mllp.listeners[0].timezone", "http.port"}
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_duplicate_listener_names_are_named(tmp_path: Path) -> None:
    text = LISTENER + LISTENER.replace("2575", "2576") + '[[mllp.listeners]]\nname = "x"\nport=1\n'
    message = config_error(write(tmp_path, text))
    assert "repeated: main" in message
    assert "x" not in message.split("repeated:")[1]


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://refloop:hunter2@db.example/refloop",
        "postgresql://refloop@db.example/refloop?password=hunter2",
        "postgresql+psycopg://:hunter2@db.example/refloop",
    ],
)
def test_database_url_with_a_password_is_refused_without_quoting_it(
    tmp_path: Path, url: str
) -> None:
    path = write(tmp_path, f'[database]\nurl = "{url}"\n')
    message = config_error(path)
    assert message.startswith(f"{path}: database.url: ")
    assert "password" in message
    assert "hunter2" not in message


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[http\nport = "8080"\n')
    message = config_error(path)
    assert message.startswith(f"{path}: TOML syntax error")
    assert "line 1" in message


def test_non_utf8_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_bytes(b'[http]\nhost = "\xff"\n')
    assert config_error(path) == f"{path}: not UTF-8 text"


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    message = config_error(path)
    assert message.startswith(f"{path}: no such config file")
    assert "REFLOOP_CONFIG" in message


def test_directory_instead_of_file_names_it(tmp_path: Path) -> None:
    assert config_error(tmp_path).startswith(f"{tmp_path}: cannot read")


def test_parse_config_names_source_too() -> None:
    with pytest.raises(ConfigError, match=r"^inline\.toml: http\.port: "):
        parse_config({"http": {"port": "eighty"}}, Path("inline.toml"))


# -- where the config comes from, and the effective database URL --------------------------


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_path(None) == Path("engine.toml")
    monkeypatch.setenv("REFLOOP_CONFIG", "/etc/refloop/engine.toml")
    assert config_path(None) == Path("/etc/refloop/engine.toml")
    assert config_path("explicit.toml") == Path("explicit.toml")


def test_load_config_uses_refloop_config_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[http]\nport = 9999\n")
    monkeypatch.setenv("REFLOOP_CONFIG", str(path))
    assert load_config().http.port == 9999


def test_relative_sqlite_path_resolves_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[database]\nurl = "sqlite:///var/refloop.db"\n', "etc/engine.toml")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    expected = (tmp_path / "etc" / "var" / "refloop.db").resolve()
    assert load_config(path).database_url() == f"sqlite:///{expected}"


def test_relative_config_path_still_resolves_to_an_absolute_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, '[database]\nurl = "sqlite:///data/r.db"\n', "etc/engine.toml")
    monkeypatch.chdir(tmp_path)
    url = load_config("etc/engine.toml").database_url()
    assert url == f"sqlite:///{(tmp_path / 'etc' / 'data' / 'r.db').resolve()}"


@pytest.mark.parametrize("url", ["sqlite:////srv/refloop/r.db", "sqlite://", "sqlite:///:memory:"])
def test_absolute_and_memory_sqlite_urls_are_unchanged(tmp_path: Path, url: str) -> None:
    cfg = load_config(write(tmp_path, f'[database]\nurl = "{url}"\n'))
    assert make_url(cfg.database_url()).database == make_url(url).database


def test_env_database_url_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(write(tmp_path, '[database]\nurl = "sqlite:///var/refloop.db"\n'))
    monkeypatch.setenv("REFLOOP_DATABASE_URL", "postgresql://u:secret@db/refloop")
    assert cfg.database_url() == "postgresql://u:secret@db/refloop"


def test_password_from_env_is_added_to_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (
        '[database]\nurl = "postgresql://refloop@db/refloop"\n[database.password]\nenv = "PGPW"\n'
    )
    cfg = load_config(write(tmp_path, text))
    monkeypatch.setenv("PGPW", "s3cret")
    assert cfg.database_url() == "postgresql://refloop:s3cret@db/refloop"


def test_password_from_file_is_added_to_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("fromfile\n")
    text = (
        '[database]\nurl = "postgresql://refloop@db/refloop"\n'
        f'[database.password]\nfile = "{secret}"\n'
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.database_url() == "postgresql://refloop:fromfile@db/refloop"


def test_source_key_in_the_file_cannot_redirect_relative_paths(tmp_path: Path) -> None:
    path = write(tmp_path, 'source = "/elsewhere/engine.toml"\n')
    assert load_config(path).source == path


def test_resolve_is_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = parse_config({}, tmp_path / "etc" / "engine.toml")
    assert isinstance(cfg, Config)
    assert cfg.resolve(Path("tls/cert.pem")) == tmp_path / "etc" / "tls" / "cert.pem"
    assert cfg.resolve(Path("/abs/cert.pem")) == Path("/abs/cert.pem")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"name": "f"}, "needs a credential"),
        (
            {
                "name": "f",
                "token": {"env": "T"},
                "subscriptions": [{"resource": "Task", "criteria": "Task?"}],
            },
            "subscriptions need server",
        ),
        (
            {
                "name": "f",
                "token": {"env": "T"},
                "subscriptions": [{"resource": "Task", "criteria": "Task?", "topic": "http://t"}],
            },
            "exactly one of criteria",
        ),
        (
            {"name": "f", "token": {"env": "T"}, "subscriptions": [{"resource": "Task"}]},
            "exactly one of criteria",
        ),
    ],
)
def test_fhir_source_mistakes_are_refused_with_what_to_fix(
    source: dict[str, object], expected: str
) -> None:
    from engine.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=expected):
        parse_config({"fhir": {"sources": [source]}}, Path("t.toml"))
