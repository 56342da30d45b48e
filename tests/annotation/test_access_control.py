"""What an annotator can do, asserted through the Argilla SDK logged in with the annotator's own key:
see only their workspace's datasets, read and answer records there, and nothing else (no deleting
records or datasets, no changing settings, no adding records)."""

from __future__ import annotations

import argilla as rg
import httpx
import pytest
from argilla._exceptions import ArgillaAPIError

from annotation.users import add_user

pytestmark = pytest.mark.argilla


def _dataset(client: rg.Argilla, name: str, workspace: str) -> rg.Dataset:
    settings = rg.Settings(
        fields=[rg.TextField("text")],
        questions=[rg.LabelQuestion("label", labels=["x", "y"])],
        guidelines="the owner's guidelines",
    )
    dataset = rg.Dataset(name=name, workspace=workspace, settings=settings, client=client).create()
    dataset.records.log([rg.Record(id=f"{name}-{i}", fields={"text": f"text {i}"}) for i in range(3)])
    return dataset


def test_an_annotator_sees_only_their_workspace_and_cannot_change_it(argilla_sqlite) -> None:
    _, conn = argilla_sqlite
    owner = conn.client()
    creds = add_user(owner, "acl-annotator", "acl-team-a")  # creates acl-team-a
    rg.Workspace(name="acl-team-b", client=owner).create()
    mine = _dataset(owner, "acl-mine", "acl-team-a")
    theirs = _dataset(owner, "acl-theirs", "acl-team-b")
    annotator = rg.Argilla(api_url=conn.url, api_key=creds.api_key, timeout=60)

    assert annotator.me.username == "acl-annotator" and annotator.me.role == "annotator"
    assert [w.name for w in annotator.workspaces] == ["acl-team-a"]
    visible = {d.name for d in annotator.datasets}
    assert "acl-mine" in visible and "acl-theirs" not in visible
    with pytest.raises(ArgillaAPIError) as denied:  # by id, which the annotator should not know
        annotator.datasets(id=theirs.id).records.to_list(flatten=True)
    assert denied.value.status_code in (403, 404)
    raw = httpx.get(
        f"{conn.url}/api/v1/datasets/{theirs.id}/records",
        headers={"X-Argilla-Api-Key": creds.api_key},
        timeout=30,
    )
    assert raw.status_code == 403

    # may read their own dataset's records the way the annotation page does
    queue = httpx.post(
        f"{conn.url}/api/v1/me/datasets/{mine.id}/records/search",
        json={},
        headers={"X-Argilla-Api-Key": creds.api_key},
        timeout=30,
    )
    assert queue.status_code == 200 and queue.json()["total"] == 3
    dataset = annotator.datasets(name="acl-mine", workspace="acl-team-a")
    records = list(mine.records)  # the owner's view, for ids to aim at
    with pytest.raises(ArgillaAPIError) as denied:
        dataset.records.delete(records[:1])
    assert denied.value.status_code == 403
    dataset.settings.guidelines = "changed by an annotator"
    with pytest.raises(ArgillaAPIError) as denied:
        dataset.update()
    assert denied.value.status_code == 403
    with pytest.raises(ArgillaAPIError) as denied:
        dataset.settings.questions["label"].labels = ["x", "y", "z"]
        dataset.settings.questions["label"].update()
    assert denied.value.status_code == 403
    with pytest.raises(ArgillaAPIError) as denied:
        dataset.records.log([rg.Record(id="acl-mine-extra", fields={"text": "planted"})])
    assert denied.value.status_code == 403
    with pytest.raises(ArgillaAPIError) as denied:
        dataset.delete()
    assert denied.value.status_code == 403

    # and the owner sees everything as it was
    after = owner.datasets(name="acl-mine", workspace="acl-team-a")
    assert after.settings.guidelines == "the owner's guidelines"
    assert after.settings.questions["label"].labels == ["x", "y"]
    assert sorted(r.id for r in after.records) == ["acl-mine-0", "acl-mine-1", "acl-mine-2"]
    assert owner.datasets(name="acl-theirs", workspace="acl-team-b") is not None and mine.id != theirs.id
