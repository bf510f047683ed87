"""/docs (Swagger UI) and /redoc work offline: every script, style and icon they load is
served by the app itself, from the fastapi-offline package's files."""

from html.parser import HTMLParser

import pytest

from tests.server.server_support import serving

pytestmark = pytest.mark.anyio

CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}


class Links(HTMLParser):
    """Every src and href in a page."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def links(html: str) -> list[str]:
    parser = Links()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}),
        ("/redoc", {"redoc.standalone.js", "favicon.png"}),
    ],
)
async def test_docs_page_loads_only_local_assets(settings, backbone, page, expected):
    async with serving(settings, backbone) as client:
        r = await client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["content-security-policy"]
        html = r.text
        assert "http://" not in html and "https://" not in html, html
        urls = links(html)
        assert {u.rsplit("/", 1)[-1] for u in urls} == expected
        for url in urls:
            assert url.startswith("/docs-assets/"), url
            asset = await client.get(url)
            assert asset.status_code == 200, url
            ctype = asset.headers["content-type"].split(";")[0]
            assert ctype in CONTENT_TYPES[url[url.rfind(".") :]], (url, ctype)
            assert len(asset.content) > 1000, url
        assert "/openapi.json" in html


async def test_swagger_ui_is_current_and_points_at_the_spec(settings, backbone):
    async with serving(settings, backbone) as client:
        html = (await client.get("/docs")).text
        assert "url: '/openapi.json'" in html
        assert '"validatorUrl": null' in html  # no call to validator.swagger.io
        bundle = (await client.get("/docs-assets/swagger-ui-bundle.js")).text
        assert "SwaggerUIBundle" in bundle
        assert (await client.get("/docs/oauth2-redirect")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200


async def test_docs_stay_open_when_tokens_are_set(tmp_path, registry_dir, backbone):
    from tests.server.server_support import settings_for

    settings = settings_for(tmp_path, registry_dir, admin_token="adm", predict_token="prd")
    async with serving(settings, backbone) as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs-assets/swagger-ui.css"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.post("/predict?task=alpha", content=b"x")).status_code == 401


async def test_root_path_prefixes_every_docs_url(settings, backbone):
    async with serving(settings, backbone) as client:
        client.app.root_path = "/piggy"
        html = (await client.get("/docs")).text
        assert all(u.startswith("/piggy/docs-assets/") for u in links(html)), links(html)
        assert "url: '/piggy/openapi.json'" in html
