"""The ledger audit as one self-contained HTML file: verdict, checks, a table per client, and for each
(client, dataset) a plot of its composed ε over time against its grant.

Nothing is fetched when the file is viewed: the styles are inline and the plots are inline SVG drawn
here (no script, no font, no image from elsewhere), so the report can be archived with the audit and
opened offline. Every value from the ledger is escaped.
"""

from __future__ import annotations

import math
from html import escape

from offsite.privacy.ledger_audit import DatasetReport, LedgerReport, parse_time

#: Plot colours: composed ε (PRV upper bound), its PLD recomputation, the grant.
PRV_COLOUR, PLD_COLOUR, GRANT_COLOUR = "#1f77b4", "#2ca02c", "#d62728"
WIDTH, HEIGHT = 680, 260
LEFT, RIGHT, TOP, BOTTOM = 60, 150, 24, 44

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; padding: 0 16px; max-width: 1000px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.verdict { padding: 10px 14px; border-radius: 6px; font-weight: 600; font-size: 16px; }
.pass { background: #e6f4ea; color: #137333; } .fail { background: #fce8e6; color: #a50e0e; }
table { border-collapse: collapse; width: 100%; margin: 8px 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #137333; font-weight: 600; } .FAIL, .fail-s { color: #a50e0e; font-weight: 600; }
.unverified { color: #b06000; font-weight: 600; } .meta td:first-child { color: #555; width: 220px; }
.plot { margin: 6px 0 18px; } ul.problems { color: #a50e0e; margin: 4px 0; }
code { font-size: 12px; }
"""


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _status(status: str) -> str:
    label = {"ok": "ok", "fail": "FAIL", "unverified": "unverified"}.get(status, status)
    css = {"fail": "fail-s"}.get(status, status)
    return f'<span class="{escape(css)}">{escape(label)}</span>'


def _ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) from 0 up to ``top``."""
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [step * i for i in range(int(top / step) + 1)]


def plot(dataset: DatasetReport) -> str:
    """Inline SVG: the dataset's composed ε after each accepted submission (PRV upper, and PLD) as step
    lines from 0, and the grant in force as a dashed step line, over the time of the ledger entries."""
    points = dataset.timeline
    if not points:
        return "<p>nothing recorded</p>"
    try:
        times = [parse_time(p.at) for p in points]
    except ValueError:  # a time stamp of the right shape that is no date: plot by entry order instead
        times = [float(i) for i in range(len(points))]
    span = max(times) - min(times)
    xs_raw = times if span > 0 else [float(i) for i in range(len(points))]
    x0, x1 = min(xs_raw), max(xs_raw)
    x1 = x1 + 0.08 * (x1 - x0) if x1 > x0 else x0 + 1  # room after the last step, so it shows
    values = [v for p in points for v in (p.epsilon_prv, p.epsilon_pld, p.grant) if v is not None]
    top = max(values + [1.0]) * 1.15
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(v: float) -> float:
        return LEFT + (v - x0) / (x1 - x0) * plot_w

    def y(v: float) -> float:
        return TOP + plot_h - v / top * plot_h

    def steps(values_at: list[tuple[float, float | None]], start: float | None) -> str:
        out, current = [], start
        for xv, v in values_at:
            if current is not None:
                out.append(f"{x(xv):.1f},{y(current):.1f}")
            if v is not None:
                out.append(f"{x(xv):.1f},{y(v):.1f}")
                current = v
        if current is not None:
            out.append(f"{x(x1):.1f},{y(current):.1f}")
        return " ".join(out)

    first = xs_raw[0]
    grant_line = steps([(xv, p.grant) for xv, p in zip(xs_raw, points, strict=True)], None)
    subs = [(xv, p) for xv, p in zip(xs_raw, points, strict=True) if p.event == "submission"]
    prv_line = steps([(xv, p.epsilon_prv) for xv, p in subs], 0.0) if subs else ""
    pld_line = steps([(xv, p.epsilon_pld) for xv, p in subs], 0.0) if subs else ""
    if subs:
        prv_line = f"{x(first):.1f},{y(0):.1f} " + prv_line
        pld_line = f"{x(first):.1f},{y(0):.1f} " + pld_line
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" class="ledger-plot" '
        f'aria-label="cumulative ε of {escape(dataset.client_id)} / {escape(dataset.dataset_id)}">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>',
    ]
    for tick in _ticks(top):
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#e5e5e5"/>'
            f'<text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick:g}</text>'
        )
    for p, anchor in ((points[0], "start"), (points[-1], "end")):
        xv = xs_raw[points.index(p)]
        parts.append(
            f'<text x="{x(xv):.1f}" y="{TOP + plot_h + 16}" font-size="11" text-anchor="{anchor}">'
            f"{escape(p.at[:19].replace('T', ' '))} UTC</text>"
        )
    parts.append(
        f'<text x="14" y="{TOP + plot_h / 2:.1f}" font-size="12" transform="rotate(-90 14 {TOP + plot_h / 2:.1f})"'
        ' text-anchor="middle">ε (composed)</text>'
    )
    if grant_line:
        parts.append(
            f'<polyline class="grant" points="{grant_line}" fill="none" stroke="{GRANT_COLOUR}" '
            'stroke-width="2.5" stroke-dasharray="8 5"/>'
        )
    if pld_line:
        parts.append(
            f'<polyline class="eps-pld" points="{pld_line}" fill="none" stroke="{PLD_COLOUR}" '
            'stroke-width="1.5" stroke-dasharray="2 3"/>'
        )
    if prv_line:
        parts.append(
            f'<polyline class="eps" points="{prv_line}" fill="none" stroke="{PRV_COLOUR}" stroke-width="3"/>'
        )
        for xv, p in subs:
            if p.epsilon_prv is not None:
                parts.append(
                    f'<circle cx="{x(xv):.1f}" cy="{y(p.epsilon_prv):.1f}" r="4" fill="{PRV_COLOUR}">'
                    f"<title>entry {p.entry}: ε = {p.epsilon_prv:.4f} (PRV upper), {_fmt(p.epsilon_pld)} (PLD)</title>"
                    "</circle>"
                )
    legend_x = LEFT + plot_w + 12
    for i, (colour, dash, text) in enumerate(
        (
            (PRV_COLOUR, "", "ε, PRV upper"),
            (PLD_COLOUR, "2 3", "ε, PLD"),
            (GRANT_COLOUR, "8 5", "grant ε"),
        )
    ):
        ly = TOP + 12 + i * 20
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<line x1="{legend_x}" x2="{legend_x + 26}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2.5"'
            f"{dash_attr}/>"
            f'<text x="{legend_x + 32}" y="{ly + 4}" font-size="12">{text}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: LedgerReport) -> str:
    """The whole report as one HTML document (a string)."""
    verdict_class = "pass" if report.ok else "fail"
    rows_meta = [
        ("source", f"{escape(report.source)} ({escape(report.source_kind)})"),
        ("ledger id", f"<code>{escape(report.ledger_id or '—')}</code>"),
        (
            "owner key",
            f"<code>sha256:{escape(report.owner_key_fingerprint or '—')}</code> "
            + ("(pinned)" if report.owner_key_pinned else '<span class="unverified">(not pinned)</span>'),
        ),
        ("entries", f"{report.entries} ({report.verified_entries} verified)"),
        ("checkpoints checked", str(report.checkpoints_checked)),
    ]
    if report.first_bad is not None:
        bad = report.first_bad
        where = "the export" if bad.index is None else f"entry {bad.index}"
        rows_meta.append(
            (
                "first bad entry",
                f'<span class="fail-s">{escape(where)}: {escape(bad.kind)}</span> — {escape(bad.detail)}',
            )
        )
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>offsite ledger audit — {escape(report.verdict)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Privacy ledger audit</h1>",
        f'<div class="verdict {verdict_class}">{escape(report.verdict)}</div>',
        '<table class="meta">',
        *(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows_meta),
        "</table>",
        "<h2>Checks</h2>",
        "<table><tr><th>check</th><th>status</th><th>stated</th><th>recomputed</th><th>detail</th></tr>",
        *(
            f"<tr><td>{escape(c.name)}</td><td>{_status(c.status)}</td><td>{escape(c.stated)}</td>"
            f"<td>{escape(c.recomputed)}</td><td>{escape(c.detail)}</td></tr>"
            for c in report.checks
        ),
        "</table>",
        "<h2>Per client</h2>",
        "<table><tr><th>client</th><th>dataset</th><th>grant ε</th><th>δ</th><th>spent ε (PRV upper)</th>"
        "<th>spent ε (PLD)</th><th>remaining</th><th>accepted</th><th>verdict</th></tr>",
    ]
    for client in report.clients.values():
        datasets = list(client.datasets.values())
        if not datasets:
            note = (
                f"{client.non_private} non-private adapter(s)"
                if client.non_private
                else "no grant, no submission"
            )
            out.append(
                f"<tr><td>{escape(client.client_id)}</td><td colspan=7>{escape(note)}</td>"
                f"<td>{_status('ok')}</td></tr>"
            )
        for d in datasets:
            out.append(
                f"<tr><td>{escape(client.client_id)}</td><td>{escape(d.dataset_id)}</td>"
                f'<td class="num">{_fmt(d.grant_epsilon, 3)}</td>'
                f'<td class="num">{"—" if d.grant_delta is None else f"{d.grant_delta:g}"}</td>'
                f'<td class="num">{_fmt(d.spent_prv)}</td><td class="num">{_fmt(d.spent_pld)}</td>'
                f'<td class="num">{_fmt(d.remaining)}</td><td class="num">{d.accepted}</td>'
                f'<td><span class="{d.verdict}">{d.verdict}</span></td></tr>'
            )
    out.append("</table>")
    out.append(
        "<p>spent: the dataset's accepted runs (the union of its receipts' cumulative histories) composed at "
        "the grant's δ, never added; remaining: grant ε − spent ε, how far below the grant (not an ε a "
        "further run may spend on its own).</p>"
    )
    for d in report.datasets():
        out.append(f"<h2>{escape(d.client_id)} / {escape(d.dataset_id)}: cumulative ε against the grant</h2>")
        out.append(f'<div class="plot">{plot(d)}</div>')
        if d.problems:
            out.append(
                '<ul class="problems">' + "".join(f"<li>{escape(p)}</li>" for p in d.problems) + "</ul>"
            )
    tolerance = report.to_dict()["tolerance"]
    out.append(
        f"<p><small>Tolerance: {escape(tolerance['stated_epsilon'])}; grants: {escape(tolerance['grant'])}. "
        "Made by <code>offsite audit ledger</code>.</small></p></body></html>"
    )
    return "\n".join(out) + "\n"
