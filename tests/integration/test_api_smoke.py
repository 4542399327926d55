from typing import Any


async def test_track(client: Any, catalog: dict[str, Any]) -> None:
    resp = await client.get(f"/api/v1/tracks/{catalog['tracks']['hells']}")
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["title"] == "Hells Bells"
    assert body["artist"]["name"] == "AC/DC"
    assert [r["format"] for r in body["renditions"]] == ["flac", "mp3"]
