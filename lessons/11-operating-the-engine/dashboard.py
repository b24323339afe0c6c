"""The dashboard: one static page at /dashboard, which the API serves (api.py includes `router`).

No build step, no framework, no CDN: dashboard.html is one file, its CSS and JavaScript inline,
so it works on a machine with no internet access and reads in one sitting. It has no endpoint of
its own either: it talks to the same JSON API any script uses (GET /stats, /tasks, /tasks/{id};
POST /tasks/{id}/retry, ...), so whatever the page can do, a script can do too, with the same
bearer token and the same errors.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

# Read once, when the API starts: the page is the same for every request, and holds no data.
PAGE = (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")


# Left out of the OpenAPI document, which describes the JSON API for the programs that use it.
@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> HTMLResponse:
    """The page. It needs no token to load: it reads the token from its URL's fragment."""
    return HTMLResponse(PAGE)
