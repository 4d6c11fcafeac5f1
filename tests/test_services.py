"""Background services and Ray's auth token: what `rayloop up` relies on before anything is served."""

import os
import socket
import stat
import subprocess
import sys

import pytest

from cluster import services
from cluster.ray_cluster import free_port
from cluster.settings import load_settings
from tests.support.paths import REPO


@pytest.fixture
def settings(data_dir):
    return load_settings()


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_service_that_exits_at_start_fails_at_once_with_its_last_log_lines(settings):
    with pytest.raises(services.ServiceFailed) as failed:
        services.start(settings, "broken", python("print('cannot bind :5000'); raise SystemExit(3)"),
                       "http://127.0.0.1:9/never", timeout=120)
    message = str(failed.value)
    assert "broken exited before it was ready (exit code 3)" in message
    assert "cannot bind :5000" in message and str(settings.log_dir / "broken.log") in message
    assert services.running_pid(settings, "broken") is None


def test_only_this_start_s_log_lines_are_shown(settings):
    settings.log_dir.mkdir(parents=True)
    (settings.log_dir / "broken.log").write_text("an old run's line\n")
    with pytest.raises(services.ServiceFailed) as failed:
        services.start(settings, "broken", python("print('this run'); raise SystemExit(1)"), "http://127.0.0.1:9/")
    assert "this run" in failed.value.tail and "an old run" not in failed.value.tail


def test_a_service_never_ready_is_stopped_after_the_timeout(settings):
    with pytest.raises(services.ServiceFailed, match="did not become ready within 2s"):
        services.start(settings, "stuck", python("import time; print('waiting'); time.sleep(600)"),
                       "http://127.0.0.1:9/", timeout=2)
    assert services.running_pid(settings, "stuck") is None
    alive = subprocess.run(["pgrep", "-f", "time.sleep(600)"], capture_output=True, text=True).stdout.split()
    assert not alive, f"the stuck service still runs: {alive}"


def test_a_health_url_answered_by_another_program_is_not_readiness(settings):
    port = free_port()
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert services.wait_until(lambda: services.http_ok(f"http://127.0.0.1:{port}/"), timeout=30)
        with pytest.raises(services.ServiceFailed, match="exited before it was ready"):
            services.start(settings, "head", python("import time; time.sleep(2); print('bind failed')"),
                           f"http://127.0.0.1:{port}/", started_line="runtime started")
    finally:
        other.terminate()
        other.wait()


def test_a_service_is_ready_once_its_log_says_so_and_it_answers(settings):
    port = free_port()
    command = python(f"import http.server, sys; print('runtime started', flush=True); "
                     f"http.server.test(http.server.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')")
    pid = services.start(settings, "head", command, f"http://127.0.0.1:{port}/", started_line="runtime started")
    assert services.running_pid(settings, "head") == pid
    assert services.stop(settings, "head")


def test_a_port_someone_listens_on_is_taken(settings):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        assert services.port_taken(holder.getsockname()[1])
    assert not services.port_taken(free_port())


def test_a_ready_service_runs_until_stopped(settings):
    port = free_port()
    pid = services.start(settings, "web", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                         f"http://127.0.0.1:{port}/", timeout=60)
    try:
        assert services.running_pid(settings, "web") == pid
        assert services.start(settings, "web", ["false"], f"http://127.0.0.1:{port}/") == pid  # already up
    finally:
        assert services.stop(settings, "web")
    assert services.running_pid(settings, "web") is None


TOKEN_PROBE = ("from cluster.ray_cluster import ensure_auth_token; "
               "print('first', ensure_auth_token()); print('second', ensure_auth_token())")


def no_token_env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_TOKEN", "RAYLOOP_"))}
    env.update(HOME=str(home), RAY_AUTH_MODE="token")
    return env


def test_a_home_without_a_ray_token_gets_one_that_only_its_user_reads(tmp_path):
    done = subprocess.run(python(TOKEN_PROBE), cwd=REPO, env=no_token_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    token = tmp_path / ".ray" / "auth_token"
    assert f"created Ray's auth token in {token}" in done.stdout
    assert f"first {token}" in done.stdout and "second None" in done.stdout  # said once
    assert len(token.read_text().strip()) >= 32
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_a_token_path_that_holds_no_token_is_an_error_not_a_new_token(tmp_path):
    env = {**no_token_env(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}
    done = subprocess.run(python(TOKEN_PROBE), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "RAY_AUTH_TOKEN_PATH" in done.stderr
    assert not (tmp_path / ".ray").exists()
