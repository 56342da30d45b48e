"""Issue 12, models: adapter paths given to the server (config, /admin/adapters, registry rows)
cannot escape `serve.adapters_root`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from alignment.config import ConfigError, load_config
from serving.config import LoopConfig, ServeConfig
from serving.feedback_store import FeedbackStore
from serving.registry import ModelRegistry, RegistryError
from tests.serving.conftest import RunningServer, app_server, serve_config


def post_adapter(url: str, server: RunningServer, name: str, path: str) -> httpx.Response:
    return httpx.post(
        f"{url}/admin/adapters", json={"name": name, "path": path}, headers=server.admin_headers, timeout=60
    )


def test_admin_adapters_stay_inside_the_root(
    server: RunningServer, adapters: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    root = adapters["a1"].parent
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    with app_server(server, tmp_path, tiny_model, adapters_root=str(root)) as url:
        # Inside: relative to the root, or absolute within it.
        assert post_adapter(url, server, "rel-a1", "a1").status_code == 200
        assert post_adapter(url, server, "abs-a2", str(adapters["a2"])).status_code == 200
        assert server.engine.adapters["rel-a1"] == root / "a1"
        for path in ("../outside", str(outside), "link-out", "a1/../../outside", "/etc"):
            r = post_adapter(url, server, "escape", path)
            assert r.status_code == 400, (path, r.text)
            error = r.json()["error"]
            assert error["param"] == "path" and "resolves outside" in error["message"], error
        assert "escape" not in server.engine.adapters


def test_admin_adapters_without_a_root_take_paths_as_given(
    server: RunningServer, adapters: dict[str, Path]
) -> None:
    assert post_adapter(server.url, server, "given-a2", str(adapters["a2"])).status_code == 200


def test_configured_adapters_outside_the_root_are_a_config_error(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    config = tmp_path / "serve.yaml"
    config.write_text(f"adapters_root: {root}\nadapters:\n  mine: ../elsewhere\n")
    with pytest.raises(ConfigError, match=r"adapters\.mine.*resolves outside"):
        load_config(ServeConfig, config)
    ok = ServeConfig(adapters_root=root, adapters={"mine": "mine"})
    assert ok.adapter_path(ok.adapters["mine"]) == root / "mine"


def test_loop_output_dir_must_be_servable(tmp_path: Path) -> None:
    serve = {"adapters_root": str(tmp_path / "served")}
    with pytest.raises(ValidationError, match="output_dir"):
        LoopConfig(serve=serve, output_dir=tmp_path / "elsewhere")
    LoopConfig(serve=serve, output_dir=tmp_path / "served" / "loop")


def test_registry_refuses_versions_outside_the_root(
    server: RunningServer, adapters: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    from serving.api import create_app

    root = adapters["a1"].parent
    store = FeedbackStore(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        guarded = ModelRegistry(store, root)
        with pytest.raises(RegistryError, match="resolves outside"):
            guarded.register("base", str(tmp_path), parent_id=None)
        version = guarded.register("base", str(adapters["a1"]), parent_id=None)
        with pytest.raises(RegistryError, match="resolves outside"):
            guarded.update(version.id, adapter_path=f"{root}/../x")
        # A row written without the check (another process, an older config) is still refused
        # when it would be promoted or served.
        stray = ModelRegistry(store).register("base", str(tmp_path), parent_id=None)
        with pytest.raises(RegistryError, match="resolves outside"):
            guarded.promote(stray.id)
        ModelRegistry(store).promote(stray.id)
        settings = serve_config(tmp_path, tiny_model, adapters_root=str(root))
        with pytest.raises(RegistryError, match=f"version {stray.id}"):
            create_app(settings, server.engine, store)
    finally:
        store.close()
