"""The API docs at /docs (Swagger UI) and /redoc (ReDoc), served offline.

FastAPI's own pages load their scripts and styles from a CDN, so they are blank without
network. These pages load them from the files that ship in the fastapi-offline package
(swagger-ui-dist and redoc builds), mounted at /docs-assets, and a Content-Security-Policy
keeps them from reaching any other host. Open (no token), like /openapi.json.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
# No validator badge: Swagger UI would ask validator.swagger.io about the spec.
SWAGGER_PARAMETERS = {"validatorUrl": None}
# The pages never reach another host: ReDoc's bundle shows a logo from its CDN (an <img>
# that hides itself when it fails), which this blocks. Inline: FastAPI's page script and
# the UIs' style attributes; blob: ReDoc's search worker.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; "
    "connect-src 'self'; frame-ancestors 'self'"
)

router = APIRouter(tags=["docs"])


def assets() -> StaticFiles:
    """swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png."""
    return StaticFiles(directory=str(files("fastapi_offline") / "static"))


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    page = get_swagger_ui_html(
        openapi_url=root + app.openapi_url,
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        swagger_ui_parameters=SWAGGER_PARAMETERS,
    )
    return _local_only(page)


@router.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    page = get_redoc_html(
        openapi_url=root + app.openapi_url,
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )
    return _local_only(page)
