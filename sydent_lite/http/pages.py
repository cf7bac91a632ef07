"""HTML answers (the landing page, the page behind the emailed validation link) and the headers
that keep a browser from turning them against the person reading them.

- Content-Security-Policy: no scripts, plugins, frames, forms or base URL from anywhere;
  inline styles and https (and data:) images are allowed, because the packaged pages and
  Sydent-style branded templates style themselves inline and show a logo from the brand's site.
- frame-ancestors 'none' and X-Frame-Options DENY (older browsers): no page of ours inside
  someone else's frame (clickjacking the "verified" page).
- Referrer-Policy no-referrer: the submitToken URL carries the validation token, which a link
  or image on the page would otherwise send to another site in the Referer header.

A constant header list per response: no per-request work beyond Starlette's own.
"""

from __future__ import annotations

from starlette.responses import HTMLResponse, RedirectResponse

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def html_page(content: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(content, status_code=status_code, headers=PAGE_HEADERS)


def redirect_from_page(url: str) -> RedirectResponse:
    """A redirect answering a page request (submitToken's next_link): the token in our URL
    must not follow the person to the next site either."""
    return RedirectResponse(url, status_code=302, headers={"Referrer-Policy": "no-referrer"})
