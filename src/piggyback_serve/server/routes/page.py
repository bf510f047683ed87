"""The try-it page at `/`: plain HTML, CSS and JS from server/web/, no build step."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

router = APIRouter(tags=["page"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


def assets() -> StaticFiles:
    """The page's scripts and styles, mounted at /web."""
    return StaticFiles(directory=WEB_DIR)
