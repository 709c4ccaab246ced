"""Every setting is checked as it is given (issue 21): a bad value is one
line naming the option (exit code 2) on the command line, and a
``ValueError`` naming the parameter from Python; never a traceback, never a
server that starts and then fails its clients.

Each value here was taken on 6ddb637: a traceback, or a server that started.
"""

from __future__ import annotations

import pytest

from wschat import Chat, Server
from wschat.__main__ import main
from wschat.chat import ChatLimits

# (option, value, the setting's name in Python): the values a newcomer was seen to type.
BAD = [
    ("--port", "-1", "port"),
    ("--port", "70000", "port"),
    ("--workers", "-1", "workers"),
    ("--history", "-1", "history"),
    ("--max-message-size", "-10", "max_message_size"),
    ("--ping-timeout", "-1", "ping_timeout"),
    ("--ping-interval", "-5", "ping_interval"),
    ("--max-connections", "-1", "max_connections"),
    ("--max-queue", "-1", "max_queue"),
    ("--rate-limit", "-2", "rate"),
    ("--rate-limit", "nan", "rate"),
    ("--rate-burst", "-3", "burst"),
    ("--max-nick-length", "-1", "max_nick_length"),
    ("--max-nick-length", "1", "max_nick_length"),  # no room for a guest's name
    ("--max-chat-length", "-4", "max_length"),
    ("--max-connections-per-ip", "-2", "max_connections_per_ip"),
    ("--path", "chat", "path"),
    ("--path", "/chat room", "path"),
    ("--static-dir", "/nonexistent", "static_dir"),
    ("--message-timeout", "-1", "message_timeout"),
    ("--max-buffered", "1000", "max_buffered"),  # smaller than one largest message
    ("--max-history-bytes", "-1", "max_history_bytes"),
    ("--max-history-total", "-1", "max_history_total"),
    ("--allowed-origin", "", "allowed_origins"),  # every browser would be refused
    ("--forwarded-allow-ip", "", "forwarded_allow_ips"),
]


def cli_error(capsys, argv) -> tuple[int, str]:
    """Exit code and standard error of ``python -m wschat argv``, run in this process."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


@pytest.mark.parametrize("option,value,name", BAD, ids=[f"{o}={v}" for o, v, _ in BAD])
def test_a_bad_value_on_the_command_line_is_one_line_naming_the_option(capsys, option, value, name):
    code, err = cli_error(capsys, [option, value])
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("python -m wschat: error: ") and option in last and value in last, err


def test_presence_timeout_is_checked_before_redis_is_called(capsys):
    """6ddb637 said "cannot reach Redis ... invalid expire time" for a Redis that was fine."""
    code, err = cli_error(capsys, ["--redis", "redis://127.0.0.1:1/0", "--presence-timeout", "-1"])
    assert code == 2 and err.strip() == "python -m wschat: error: --presence-timeout must be a number of seconds > 0, not -1.0"


def test_the_redis_engine_keeps_the_history_bound_the_command_line_gives():
    pytest.importorskip("redis", reason="pip install 'wschat[redis]'")
    from wschat.cli import parse_args, redis_engine

    engine = redis_engine(parse_args(["--redis", "redis://127.0.0.1:1/0", "--max-history-bytes", "4KiB"]))
    command = engine.store.batch("main", ["{}"])  # EVALSHA, its name, the number of keys, the keys, then ARGV
    assert engine.store.max_history_bytes == 4096 == command[3 + command[2] + 5]  # ARGV[6], the script's bound


def make(name: str, value):
    """The Python object that takes setting ``name``, given ``value``."""
    if name in {"max_length", "rate", "burst", "max_nick_length"}:
        return ChatLimits(**{name: value})
    if name in {"history", "path", "max_history_bytes", "max_history_total"}:
        return Chat(Server(port=None), **{name: value})
    return Server(**{"port": 0, name: value})


@pytest.mark.parametrize("option,value,name", BAD, ids=[f"{n}={v}" for _, v, n in BAD])
def test_a_bad_value_from_python_is_a_value_error_naming_the_parameter(option, value, name):
    if name in {"allowed_origins", "forwarded_allow_ips"}:
        value = [value]  # as the command line gives them
    elif name not in {"path", "static_dir"}:
        value = float(value) if "." in value or value == "nan" else int(value)
    with pytest.raises(ValueError, match=rf"^{name} must be "):
        make(name, value)


def test_redis_engine_checks_its_settings_before_connecting():
    pytest.importorskip("redis", reason="pip install 'wschat[redis]'")
    from wschat.redis_engine import RedisEngine

    for settings in ({"presence_timeout": -1}, {"presence_timeout": 0}, {"history": -5}, {"room_ttl": 0},
                     {"prefix": "chat{1}"}, {"max_backlog": 0}, {"max_backlog_bytes": 0}, {"max_history_bytes": -1}):
        with pytest.raises(ValueError, match=rf"^{next(iter(settings))} must be "):
            RedisEngine("redis://127.0.0.1:1/0", **settings)


@pytest.mark.parametrize("settings", [
    {"port": 65535}, {"port": 0}, {"port": None}, {"ping_timeout": None}, {"ping_timeout": 0}, {"ping_interval": 0},
    {"max_buffered": 0}, {"message_timeout": 0}, {"workers": 0}, {"max_connections_per_ip": 0},
    {"max_message_size": 1 << 20, "max_buffered": 1 << 20},
])
def test_what_each_limit_says_means_none_is_taken(settings):
    server = Server(**settings)
    assert all(getattr(server, "requested_port" if name == "port" else name) in (value, None)
               for name, value in settings.items())


def test_limits_off_and_short_nicknames_are_taken():
    assert ChatLimits.off().rate == 0 and ChatLimits(max_nick_length=2).max_nick_length == 2
    assert ChatLimits(max_nick_length=0).max_nick_length == 0


@pytest.mark.parametrize("settings", [
    {"on_message": "echo"}, {"on_open": 1}, {"authorize": True},  # a handler that could never be called
    {"subprotocols": "wschat.v1"},  # one str, not a list: it would offer 'w', 's', 'c'...
    {"subprotocols": ["wschat.v1", ""]}, {"subprotocols": ["a b"]}, {"subprotocols": [1]},
])
def test_a_resource_refuses_handlers_and_subprotocols_that_cannot_work(settings):
    server = Server(port=None)
    with pytest.raises(ValueError, match=rf"^{next(iter(settings))} must be "):
        server.resource("/chat", **settings)
    assert server.resource("/chat", on_message=print, subprotocols=("wschat.v1",)).subprotocols == ("wschat.v1",)


@pytest.mark.parametrize("settings", [
    {"allowed_origins": "https://chat.example"},  # one str: every browser would be refused, letter by letter
    {"forwarded_allow_ips": "127.0.0.1"},  # one str: the proxy would never be trusted
    {"allowed_origins": ["https://chat.example", None]},
    {"ssl_context": "cert.pem"},  # a path is not a context: every TLS client would fail
    {"host": 1984},
])
def test_a_server_refuses_lists_given_as_one_str_and_values_of_the_wrong_kind(settings):
    with pytest.raises(ValueError, match=rf"^{next(iter(settings))} must be "):
        Server(port=0, **settings)
    server = Server(port=0, allowed_origins=("https://chat.example",), forwarded_allow_ips={"127.0.0.1"})
    assert server.allowed_origins == ["https://chat.example"] and server.forwarded_allow_ips == {"127.0.0.1"}


@pytest.mark.parametrize("settings", [
    {"engine": "redis://127.0.0.1:6379/0"},  # a URL, not RedisEngine(url): it failed with an AttributeError
    {"limits": {"rate": 0}},  # a dict, not ChatLimits(rate=0): the first message failed
    {"welcome": None}, {"authorize": "yes"}, {"nick_of": "name"}, {"user_id": 1},
    {"page_config": "wschat.json"},  # no leading /: a route no request matches
])
def test_a_chat_refuses_values_of_the_wrong_kind(settings):
    server = Server(port=None)
    with pytest.raises(ValueError, match=rf"^{next(iter(settings))} must be "):
        Chat(server, **settings)
    assert server.resources == ()  # refused before it took the path
    Chat(server, welcome="", limits=ChatLimits.off(), page_config=None)

