"""`prefloop annotate up|status|users add|down` through the CLI, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from annotation.cli import annotate_app
from annotation.config import ServerSettings
from annotation.workspace import _is_ours, _read_state, free_port, server_home

runner = CliRunner()


@pytest.mark.argilla
def test_up_status_users_down_manage_exactly_their_processes(tmp_path) -> None:
    home = tmp_path / "argilla"
    opts = ["--set", f"server.home={home}", "--set", f"server.port={free_port()}"]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        up = runner.invoke(annotate_app, ["up", *opts])
        assert up.exit_code == 0, up.output
        assert "First run: owner prefloop" in up.output  # credentials shown on the first start only
        owner = json.loads((home / "owner.json").read_text())
        assert (home / "owner.json").stat().st_mode & 0o777 == 0o600
        assert owner["api_key"] not in (home / "logs" / "server.log").read_text()  # no secrets in logs
        processes = _read_state(home)["processes"]
        assert set(processes) == {"redis", "server", "worker"}

        status = runner.invoke(annotate_app, ["status", *opts])
        assert status.exit_code == 0 and "ready=True" in status.output
        again = runner.invoke(annotate_app, ["up", *opts])
        assert again.exit_code == 0 and "already running" in again.output

        added = runner.invoke(
            annotate_app, ["users", "add", "carol", "--set", "dataset.workspace=team-a", *opts]
        )
        assert added.exit_code == 0, added.output
        assert "username: carol" in added.output and "api key:" in added.output

        down = runner.invoke(annotate_app, ["down", *opts])
        assert down.exit_code == 0 and "worker, server, redis" in down.output
        assert not any(_is_ours(info) for info in processes.values())
        assert bystander.poll() is None  # a process `up` did not start is left alone
        assert runner.invoke(annotate_app, ["status", *opts]).exit_code == 1
    finally:
        bystander.kill()
        bystander.wait()
        from annotation.workspace import down as stop

        stop(ServerSettings(home=str(home)))


def test_remote_server_without_api_key_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    result = runner.invoke(
        annotate_app,
        ["progress", "--set", "server.url=http://127.0.0.1:9", "--set", f"server.home={tmp_path}"],
    )
    assert result.exit_code == 1
    assert "no API key for http://127.0.0.1:9" in result.output


def test_bad_config_names_the_key(tmp_path) -> None:
    config = tmp_path / "annotation.yaml"
    config.write_text("server:\n  port: many\npull:\n  min_vote: 3\n")
    result = runner.invoke(annotate_app, ["pull", "--config", str(config)])
    assert result.exit_code == 2
    assert "server.port" in result.output and "pull.min_vote: unknown key" in result.output
    assert str(config) in result.output


def test_server_home_defaults_under_prefloop_home(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PREFLOOP_HOME", str(tmp_path))
    assert server_home(ServerSettings()) == tmp_path / "argilla"


def test_up_against_a_remote_argilla_checks_it_instead_of_starting_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ARGILLA_API_KEY", "some-key")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = runner.invoke(
        annotate_app, ["up", "--set", f"server.url={url}", "--set", f"server.home={tmp_path}"]
    )
    assert result.exit_code == 1 and f"cannot reach Argilla at {url}" in result.output
    assert not (tmp_path / "run").exists()  # no local process was started


def _kill_all(home) -> None:
    """SIGKILL every workspace process at once (a crash, not a shutdown), and reap them."""
    import contextlib
    import os
    import signal

    processes = _read_state(home)["processes"]
    for info in processes.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(info["pid"], signal.SIGKILL)
    for info in processes.values():
        with contextlib.suppress(ChildProcessError):  # our children: `up` ran in this process
            os.waitpid(info["pid"], 0)


@pytest.mark.argilla
@pytest.mark.slow
def test_a_killed_workspace_keeps_submitted_responses_and_queued_jobs(tmp_path) -> None:
    import os
    import signal
    import time

    import argilla as rg
    import httpx

    from annotation import workspace
    from annotation.users import add_user

    settings = ServerSettings(home=str(tmp_path / "argilla"), port=free_port(), startup_timeout_s=180)
    home = server_home(settings)
    conn = workspace.up(settings)
    try:
        client = conn.client()
        ann = [add_user(client, f"crash-{i}", "crash") for i in (1, 2)]
        dataset = rg.Dataset(
            name="crash",
            workspace="crash",
            settings=rg.Settings(
                fields=[rg.TextField("text")],
                questions=[rg.LabelQuestion("label", labels=["x", "y"])],
                distribution=rg.TaskDistribution(min_submitted=2),
            ),
            client=client,
        ).create()
        dataset.records.log([rg.Record(id=f"r{i}", fields={"text": f"text {i}"}) for i in range(3)])
        headers = {"X-Argilla-Api-Key": conn.api_key}
        api = f"{conn.url}/api/v1"
        records = httpx.get(f"{api}/datasets/{dataset.id}/records", headers=headers).json()["items"]
        r0 = next(r for r in records if r["external_id"] == "r0")
        for creds in ann:  # two annotators submit through the API: r0 is completed
            answer = {"values": {"label": {"value": "x"}}, "status": "submitted"}
            sent = httpx.post(
                f"{api}/records/{r0['id']}/responses",
                json=answer,
                headers={"X-Argilla-Api-Key": creds.api_key},
            )
            assert sent.status_code == 201, sent.text

        def r0_status() -> str:
            body = httpx.get(f"{api}/records/{r0['id']}", headers=headers, timeout=10).json()
            return body["status"]

        assert r0_status() == "completed"
        # With the worker down, raising min_submitted queues a job that re-derives record status.
        worker = _read_state(home)["processes"]["worker"]
        os.killpg(worker["pid"], signal.SIGKILL)
        changed = httpx.patch(
            f"{api}/datasets/{dataset.id}",
            json={"distribution": {"strategy": "overlap", "min_submitted": 3}},
            headers=headers,
        )
        assert changed.status_code == 200, changed.text
        time.sleep(1.5)  # past Redis' once-a-second fsync of its append-only file
        assert r0_status() == "completed"  # the job is queued, not run

        _kill_all(home)  # redis, server (and the dead worker): a crash of the whole workspace
        conn = workspace.up(settings)  # restarts with no manual repair
        deadline = time.monotonic() + 60
        while r0_status() != "pending" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert r0_status() == "pending"  # the queued job survived and the new worker ran it
        responses = httpx.get(f"{api}/records/{r0['id']}", headers=headers, params={"include": "responses"})
        saved = [r for r in responses.json()["responses"] if r["status"] == "submitted"]
        assert len(saved) == 2  # both acknowledged submissions are still there
    finally:
        workspace.down(settings)
