"""Tiny HTML helpers: escaped text, images with alt text, tables and one page template.

Pages are static, need no JavaScript, and keep to semantic HTML (headings, <main>, <nav>,
<table> with <th scope>) so they read well with a screen reader and a keyboard.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Iterable, Optional, Sequence

CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#111;background:#fff;line-height:1.4}
main{padding:0 1.2rem 2rem;max-width:78rem}
header{background:#1b2a4a;color:#fff;padding:.6rem 1.2rem}
header a{color:#fff}
nav a{margin-right:1rem}
a{color:#0645ad}
a:focus,a:hover{outline:3px solid #ff9900;outline-offset:2px}
.skip{position:absolute;left:-999px}
.skip:focus{left:.5rem;top:.5rem;background:#fff;color:#000;padding:.3rem}
table{border-collapse:collapse;margin:.6rem 1rem .6rem 0}
th,td{border:1px solid #bbb;padding:.25rem .5rem;text-align:right;vertical-align:top}
th[scope=row],td.l{text-align:left}
figure{display:inline-block;margin:.2rem .4rem .6rem 0;text-align:center;font-size:.8rem;max-width:9rem}
figure img{display:block;border:1px solid #999;image-rendering:pixelated}
.wrong{color:#b00020;font-weight:bold}
.right{color:#006b2e;font-weight:bold}
.row{display:flex;flex-wrap:wrap;align-items:flex-start}
""".strip()


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def link(href: str, text: str, **attrs) -> str:
    extra = "".join(f' {k.rstrip("_")}="{esc(v)}"' for k, v in attrs.items())
    return f'<a href="{esc(href)}"{extra}>{esc(text)}</a>'


def figure(src: str, alt: str, caption: str = "") -> str:
    """An image file with alt text and a visible caption."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{esc(src)}" alt="{esc(alt)}">{cap}</figure>'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], caption: str = "", raw: bool = False) -> str:
    """A table; the first cell of each row is its row header. ``raw``: cells are already HTML."""
    cell = (lambda v: str(v)) if raw else esc
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(
        (f'<th scope="row">{cell(v)}</th>' if i == 0 else f"<td>{cell(v)}</td>") for i, v in enumerate(row))
        + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str, nav: Sequence[tuple] = (), home: Optional[str] = None) -> str:
    """A whole page: skip link, header with navigation links (href, text), then ``body`` in <main>."""
    links = "".join(link(href, text) for href, text in nav)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f'<a class="skip" href="#main">Skip to content</a>'
            f'<header><nav aria-label="report">{links}</nav></header>'
            f'<main id="main"><h1>{esc(title)}</h1>{body}</main></body></html>\n')


def write_page(path: Path, title: str, body: str, nav: Sequence[tuple] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page(title, body, nav), encoding="utf-8")
    tmp.replace(path)
    return path
