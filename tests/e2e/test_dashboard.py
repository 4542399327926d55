"""The live dashboard in real headless Chromium: it loads with its CSP, draws its charts from the
JSON endpoint, lists the alerts, and a screenshot is kept in artifacts/."""

from __future__ import annotations

from typing import Any

import pytest

from edge import keys
from tests.e2e.browser import artifact, browser

pytestmark = pytest.mark.e2e


async def test_dashboard_renders_with_data(make_client: Any, catalog: dict[str, Any]) -> None:
    client = await make_client()
    sampler = client.app[keys.SAMPLER]
    sampler.sample()
    for _ in range(30):
        await client.get(f"/api/v1/tracks/{catalog['tracks']['hells']}")
        await client.get("/api/v1/search", params={"q": "hell"})
    sampler.sample()  # two readings: one point of rates
    for _ in range(10):
        await client.get("/api/v1/tracks/popular")
    sampler.sample()

    data = await (await client.get("/dashboard/data")).json()
    # The background sampler may have added points of its own meanwhile.
    assert len(data["points"]) >= 2
    assert any(p["rps"].get("api_popular", 0) > 0 for p in data["points"])
    assert any("track" in p["hit_ratio"] for p in data["points"])
    assert isinstance(data["statements"], str | list)

    url = str(client.make_url("/dashboard"))
    errors: list[str] = []
    async with browser() as b:
        page = await b.new_page(viewport={"width": 1280, "height": 1400})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        response = await page.goto(url)
        assert response is not None and response.status == 200
        assert "script-src 'self'" in (await response.all_headers())["content-security-policy"]
        await page.wait_for_function(
            "[...document.querySelectorAll('canvas')].filter(c => +c.dataset.drawn >= 2).length"
            " >= 9",
            timeout=15000,
        )
        legend = await page.locator("#legend-rps li").all_inner_texts()
        assert "api_popular" in legend
        alerts = await page.locator("#alerts li").all_inner_texts()
        assert any("cache_hit_rate" in a for a in alerts)
        # The rps chart has ink on it: some pixels differ from the background.
        painted = await page.evaluate(
            """() => {
                const c = document.getElementById('chart-rps');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
                return n;
            }"""
        )
        assert painted > 500
        await page.screenshot(path=str(artifact("dashboard.png")), full_page=True)
    assert errors == []
