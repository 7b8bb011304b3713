"""Rendering a report: PNG figures and the same blocks as Markdown or as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def render_md(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind != "li" and lines and lines[-1].startswith("- "):
            lines.append("")
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + b[1], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "li":
            lines.append(f"- {b[1]}")
        elif kind == "table":
            lines.append("| " + " | ".join(b[1]) + " |")
            lines.append("|" + "|".join("---" for _ in b[1]) + "|")
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in b[2]]
            lines.append("")
        elif kind == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
    return "\n".join(lines).rstrip() + "\n"


def render_html(blocks: list[tuple]) -> str:
    e = html.escape
    body: list[str] = []
    in_list = False
    for b in blocks:
        kind = b[0]
        if kind != "li" and in_list:
            body.append("</ul>")
            in_list = False
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif kind == "li":
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{e(b[1])}</li>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(b[3]).decode()
            body.append(
                f'<figure><img alt="{e(b[2])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(b[2])}</figcaption></figure>"
            )
    if in_list:
        body.append("</ul>")
    style = (
        "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:1rem 0}"
        "td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}"
        "th{background:#f3f3f3}figure{margin:1rem 0}img{max-width:100%}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>lmcompress sweep report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
