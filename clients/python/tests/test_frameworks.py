"""The Flask extension, the FastAPI lifespan and the Django app, each
skipped when its framework is not installed."""

import asyncio
import functools
import os
import subprocess
import sys
import textwrap

import pytest

import z4j_agentd


def test_flask_init_app(standin, sock_path):
    flask = pytest.importorskip("flask")
    from z4j_agentd.flask import Z4JAgentd

    app = flask.Flask("z4jtest")
    app.config["Z4J_AGENTD_SOCKET_PATH"] = sock_path
    app.config["Z4J_AGENTD_ENGINES"] = ["rq"]
    ext = Z4JAgentd(process="flask test")
    ext.init_app(app)
    client = app.extensions["z4j_agentd"]
    assert client is ext.client is z4j_agentd.get_client()
    assert client.socket_path == sock_path and client.framework == "flask"
    assert client.process == "flask test" and client.engines == ["rq"]

    @app.route("/work")
    def work():
        z4j_agentd.emit("rq", "task.sent", "job-1", {"task_name": "jobs.work"})
        return "ok"

    assert app.test_client().get("/work").status_code == 200
    assert client.flush(5)
    assert [e["task_id"] for e in standin.events()] == ["job-1"]
    assert standin.all("hello")[0][1]["framework"] == "flask"


def test_flask_constructor_form_and_config_precedence(sock_path):
    flask = pytest.importorskip("flask")
    from z4j_agentd.flask import Z4JAgentd

    app = flask.Flask("z4jtest2")
    app.config["Z4J_AGENTD_QUEUE_SIZE"] = 7
    ext = Z4JAgentd(app, socket_path=sock_path, queue_size=100)
    assert ext.client.queue_size == 7 and ext.client.socket_path == sock_path
    with pytest.raises(TypeError):
        Z4JAgentd(sockt_path="typo")


def test_fastapi_lifespan(standin, sock_path):
    fastapi = pytest.importorskip("fastapi")
    import z4j_agentd.fastapi

    app = fastapi.FastAPI(lifespan=functools.partial(z4j_agentd.fastapi.lifespan, socket_path=sock_path))

    async def run():
        async with app.router.lifespan_context(app):
            client = app.state.z4j_agentd
            assert client is z4j_agentd.get_client()
            assert client.framework == "fastapi" and client.socket_path == sock_path
            client.emit("arq", "task.received", "a-1", {"task_name": "jobs.a"})
        return client

    client = asyncio.run(run())
    assert client.stats()["closed"] and client.stats()["sent"] == 1  # flushed on exit
    assert [e["task_id"] for e in standin.events()] == ["a-1"]


def test_fastapi_default_lifespan_and_composition(standin, sock_path, monkeypatch):
    fastapi = pytest.importorskip("fastapi")
    from contextlib import asynccontextmanager

    from z4j_agentd.fastapi import Z4JAgentd, lifespan

    monkeypatch.setenv("Z4J_SOCKET_PATH", sock_path)
    plain = fastapi.FastAPI(lifespan=lifespan)

    @asynccontextmanager
    async def mine(app):
        async with Z4JAgentd(app, engines=["taskiq"]) as client:
            app.state.mine = True
            yield
        assert client.stats()["closed"]

    composed = fastapi.FastAPI(lifespan=mine)

    async def run():
        async with plain.router.lifespan_context(plain):
            assert plain.state.z4j_agentd.socket_path == sock_path
        async with composed.router.lifespan_context(composed):
            assert composed.state.mine and composed.state.z4j_agentd.engines == ["taskiq"]
            composed.state.z4j_agentd.emit("taskiq", "task.started", "q-1")

    asyncio.run(run())
    assert [e["task_id"] for e in standin.events()] == ["q-1"]


DJANGO_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "z4j_agentd.django"],
        Z4J_AGENTD=json.loads(os.environ["Z4J_AGENTD_SETTINGS"]),
    )
    django.setup()

    import z4j_agentd
    import z4j_agentd.celery as z4j_celery
    from django.apps import apps

    client = z4j_agentd.get_client()
    z4j_agentd.emit("celery", "task.received", "dj-1", {"task_name": "app.tasks.add"})
    flushed = client.flush(5)
    hooks = z4j_celery.installed()
    print(json.dumps({
        "label": apps.get_app_config("z4j_agentd").name,
        "framework": client.framework,
        "socket_path": client.socket_path,
        "engines": client.engines,
        "flushed": flushed,
        "celery_installed": hooks is not None,
        "celery_app_main": getattr(hooks.app, "main", None) if hooks else None,
        "serve_commands": hooks.serve_commands if hooks else None,
    }))
''')


def run_django(settings_map, tmp_path):
    import json

    env = dict(os.environ, Z4J_AGENTD_SETTINGS=json.dumps(settings_map), PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", DJANGO_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_django_app(standin, sock_path, tmp_path):
    pytest.importorskip("django")
    import importlib.util

    celery_installed = importlib.util.find_spec("celery") is not None
    (tmp_path / "djproj_celery.py").write_text(
        "from celery import Celery\napp = Celery('djproj', broker='memory://')\n")
    report = run_django({"socket_path": sock_path, "process": "django test", "engines": ["celery"],
                         "celery_app": "djproj_celery:app", "serve_commands": False}, tmp_path)
    assert report["label"] == "z4j_agentd.django"
    assert report["framework"] == "django" and report["socket_path"] == sock_path
    assert report["engines"] == ["celery"] and report["flushed"] is True
    assert [e["task_id"] for e in standin.events()] == ["dj-1"]
    if celery_installed:
        assert report["celery_installed"] and report["celery_app_main"] == "djproj"
        assert report["serve_commands"] is False


def test_django_without_celery_app_setting_uses_current_app(standin, sock_path, tmp_path):
    pytest.importorskip("django")
    pytest.importorskip("celery")
    report = run_django({"socket_path": sock_path}, tmp_path)
    assert report["celery_installed"] and report["serve_commands"] is True
    skipped = run_django({"socket_path": sock_path, "celery": False}, tmp_path)
    assert skipped["celery_installed"] is False


@pytest.fixture
def fake_engines(monkeypatch):
    """Stand-ins for z4j_agentd.<engine> recording what each install gets, and
    a module `fakeproj` holding the engines' objects (for import paths)."""
    import types

    from z4j_agentd import _engines

    calls = []
    for engine in _engines.TARGETS:
        module = types.ModuleType(f"z4j_agentd.{engine}")

        def install(target, client, *, serve_commands=True, _engine=engine):
            calls.append((_engine, target, client, serve_commands))
            return client

        module.install = install
        monkeypatch.setitem(sys.modules, f"z4j_agentd.{engine}", module)
    proj = types.ModuleType("fakeproj")
    proj.broker = object()
    proj.huey = object()
    monkeypatch.setitem(sys.modules, "fakeproj", proj)
    return calls, proj


def test_flask_wires_each_engine_named(fake_engines, sock_path):
    flask = pytest.importorskip("flask")
    from z4j_agentd.flask import Z4JAgentd

    calls, proj = fake_engines
    settings = object()
    app = flask.Flask("z4jengines")
    app.config["Z4J_AGENTD_HUEY_APP"] = "fakeproj:huey"
    app.config["Z4J_AGENTD_SERVE_COMMANDS"] = False
    ext = Z4JAgentd(app, socket_path=sock_path, dramatiq_broker=proj.broker, arq_settings=settings)
    assert [(c[0], c[1], c[3]) for c in calls] == [
        ("dramatiq", proj.broker, False), ("huey", proj.huey, False), ("arq", settings, False)]
    assert all(c[2] is ext.client for c in calls)
    with pytest.raises(TypeError):
        Z4JAgentd(huey=proj.huey)  # the argument is huey_app


def test_fastapi_wires_each_engine_named(fake_engines, sock_path):
    pytest.importorskip("fastapi")
    from z4j_agentd.fastapi import Z4JAgentd

    calls, proj = fake_engines

    async def run():
        async with Z4JAgentd(None, socket_path=sock_path, taskiq_broker="fakeproj.broker",
                             rq_connection=proj.huey) as client:
            return client

    client = asyncio.run(run())
    assert [(c[0], c[1], c[2], c[3]) for c in calls] == [
        ("rq", proj.huey, client, True), ("taskiq", proj.broker, client, True)]


def test_a_bad_import_path_says_what_to_write(fake_engines):
    from z4j_agentd import _engines

    with pytest.raises(ValueError, match="package.module:attribute"):
        _engines.install("huey", "nocolon", None)
    with pytest.raises(ModuleNotFoundError):
        _engines.install("huey", "no_such_module_z4j:huey", None)
    with pytest.raises(ValueError, match="unknown engine"):
        _engines.install("resque", object(), None)


DJANGO_ENGINES_SCRIPT = textwrap.dedent('''
    import json, os
    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "huey.contrib.djhuey", "z4j_agentd.django"],
        HUEY={"huey_class": "huey.MemoryHuey", "name": "djtest", "immediate": False},
        Z4J_AGENTD=json.loads(os.environ["Z4J_AGENTD_SETTINGS"]),
    )
    django.setup()

    import z4j_agentd
    import z4j_agentd.huey as z4j_huey
    from huey.contrib.djhuey import HUEY

    @HUEY.task()
    def add(a, b):
        return a + b

    add(2, 3)
    client = z4j_agentd.get_client()
    print(json.dumps({"huey_installed": z4j_huey.installed(HUEY) is not None,
                      "engines": client.engines, "flushed": client.flush(5)}))
''')


def test_django_picks_up_django_huey_as_it_picks_up_celery(standin, sock_path, tmp_path):
    pytest.importorskip("django")
    pytest.importorskip("huey")
    import json

    env = dict(os.environ, Z4J_AGENTD_SETTINGS=json.dumps({"socket_path": sock_path, "celery": False}),
               PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", DJANGO_ENGINES_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["huey_installed"] and report["flushed"] and "huey" in report["engines"]
    (received,) = [e for e in standin.events() if e["kind"] == "task.received"]
    assert received["engine"] == "huey" and received["data"]["args"] == [2, 3]
    # switched off like Celery
    env["Z4J_AGENTD_SETTINGS"] = json.dumps({"socket_path": sock_path, "celery": False, "huey": False})
    out = subprocess.run([sys.executable, "-c", DJANGO_ENGINES_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["huey_installed"] is False


def test_flask_wires_real_dramatiq_and_rq(standin, sock_path):
    flask = pytest.importorskip("flask")
    dramatiq = pytest.importorskip("dramatiq")
    pytest.importorskip("rq")
    from dramatiq.brokers.stub import StubBroker

    import z4j_agentd.dramatiq as z4j_dramatiq
    from z4j_agentd.flask import Z4JAgentd

    broker = StubBroker()
    dramatiq.set_broker(broker)
    try:
        app = flask.Flask("z4jreal")
        ext = Z4JAgentd(app, socket_path=sock_path, dramatiq_broker=broker, rq_connection=object())

        @dramatiq.actor(broker=broker)
        def add(a, b):
            return a + b

        add.send(4, 5)
        assert ext.client.flush(5)
        assert {"dramatiq", "rq"} <= set(ext.client.engines)
        (received,) = [e for e in standin.events() if e["kind"] == "task.received"]
        assert received["engine"] == "dramatiq" and received["data"]["args"] == [4, 5]
    finally:
        z4j_dramatiq.uninstall()


def test_fastapi_wires_a_real_taskiq_broker(standin, sock_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("taskiq")
    from taskiq import InMemoryBroker

    import z4j_agentd.taskiq as z4j_taskiq
    from z4j_agentd.fastapi import Z4JAgentd

    broker = InMemoryBroker()

    @broker.task
    async def add(a, b):
        return a + b

    async def run():
        async with Z4JAgentd(None, socket_path=sock_path, taskiq_broker=broker) as client:
            assert z4j_taskiq.installed(broker) is not None
            await add.kiq(6, 7)
            assert client.flush(5)
        return client

    client = asyncio.run(run())
    assert "taskiq" in client.engines
    received = [e for e in standin.events() if e["kind"] == "task.received"]
    assert received and received[0]["engine"] == "taskiq" and received[0]["data"]["args"] == [6, 7]
