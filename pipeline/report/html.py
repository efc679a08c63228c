"""HTML building blocks for the report: one self-contained page, every value escaped.

No template engine and no script: plain strings, CSS inline, pictures as ``data:`` URIs,
collapsible parts as ``<details>``, so the file opens from a mail attachment or a CI artifact
with no network and nothing to run. Every value goes through :func:`esc` (markupsafe's
escape): only what was built as ``Markup`` passes unescaped, so there is no flag or column
index by which a caller's string could skip escaping.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from markupsafe import Markup, escape

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
header{background:#1d2329;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:21px}
header p{margin:0;color:#c9d1d9}
nav{padding:8px 28px;background:#e9edf1;position:sticky;top:0;z-index:1;font-size:13px}
nav a{margin-right:14px;color:#1f5f99;text-decoration:none}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde2e7;border-radius:6px;padding:14px 18px;margin:16px 0}
h2{font-size:17px;margin:0 0 10px}
h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border-bottom:1px solid #e3e7eb;padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#57606a;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:4px 0 8px}
.card{background:#f0f4f8;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px}
.card span{color:#57606a;font-size:12px}
.todo li{margin:3px 0}
.note{color:#57606a;font-size:12.5px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.item{border:1px solid #e3e7eb;border-radius:6px;padding:8px;background:#fbfcfd}
.row{display:flex;gap:8px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:11.5px;color:#3d444d}
figure img,.missing{display:block;margin:0 auto 3px;border:1px solid #d0d7de;background:#fff}
.missing{display:flex;align-items:center;justify-content:center;color:#8c959f;font-size:11px;background:#f3f4f6}
.bad{color:#b42318;font-weight:600}
.good{color:#1a7f37;font-weight:600}
.tag{display:inline-block;padding:0 6px;border-radius:8px;font-size:11px;background:#eef1f4;margin-left:4px}
.tag.leak{background:#fde2e1;color:#b42318}
.tag.exact{background:#fff1c2}
img.chart{max-width:100%;height:auto;border:0}
details summary{cursor:pointer;color:#1f5f99}
code{background:#eef1f4;padding:0 4px;border-radius:3px;font-size:12.5px}
"""


def esc(value: Any) -> Markup:
    """``value`` as HTML text: escaped, unless it is ``Markup`` already (built as HTML on purpose)."""
    return escape(value)


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for tables: floats rounded, ints with thousands separators, None as a dash."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """A table; columns in ``numeric`` are right-aligned; a ``Markup`` cell is HTML already, any other is escaped."""
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{esc(h)}</th>' for i, h in enumerate(headers))
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            text = esc(fmt(v))
            cells.append(f'<td{" class=num" if i in numeric else ""}>{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in pairs if v not in (None, ""))
    return f"<table>{rows}</table>"


def cards(items: Iterable[tuple[str, Any]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><b>{esc(fmt(v))}</b><span>{esc(k)}</span></div>' for k, v in items) + "</div>"


def thumb(uri: str | None, caption: Sequence[str], size: int, title: str = "", css: str = "") -> str:
    """A thumbnail with caption lines; a grey box saying why when there is no picture."""
    lines = "<br>".join(esc(c) for c in caption)
    if uri:
        picture = f'<img src="{uri}" alt="{esc(title)}" title="{esc(title)}" width="{size}" height="{size}" style="object-fit:contain">'
    else:
        picture = f'<div class="missing" style="width:{size}px;height:{size}px" title="{esc(title)}">no image</div>'
    return f'<figure class="{css}">{picture}<figcaption>{lines}</figcaption></figure>'


def chart(uri: str, alt: str, width: int | None = None) -> str:
    return f'<img class="chart" src="{uri}" alt="{esc(alt)}"' + (f' style="width:{width}px"' if width else "") + ">"


def section(anchor: str, heading: str, body: str, note: str = "") -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(heading)}</h2>{body}' + (f'<p class="note">{esc(note)}</p>' if note else "") + "</section>"


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document; ``sections`` are (anchor, nav label, HTML)."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(label)}</a>' for a, label, _ in sections)
    body = "".join(h for _, _, h in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")
