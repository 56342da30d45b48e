"""Annotator accounts: created by the owner, added to the project's workspace."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

import argilla as rg
import httpx

Role = Literal["annotator", "admin", "owner"]


@dataclass(frozen=True)
class UserCredentials:
    username: str
    password: str
    api_key: str
    role: str


def add_user(
    client: rg.Argilla, username: str, workspace: str, role: Role = "annotator", password: str | None = None
) -> UserCredentials:
    """Create the user (password generated when not given) and add them to `workspace` (created if missing)."""
    password = password or secrets.token_urlsafe(12)
    ws = client.workspaces(workspace) or rg.Workspace(name=workspace, client=client).create()
    user = rg.User(username=username, password=password, role=role, client=client).create()
    if role != "owner":  # owners see every workspace already
        user.add_to_workspace(ws)
    # the SDK does not expose other users' keys; the owner can read them from the API
    response = httpx.get(
        f"{client.api_url.rstrip('/')}/api/v1/users/{user.id}",
        headers={"X-Argilla-Api-Key": client.api_key},
        timeout=30,
    )
    response.raise_for_status()
    return UserCredentials(username, password, response.json()["api_key"], role)
