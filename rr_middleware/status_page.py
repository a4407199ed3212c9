"""The status page: every pool and upstream at a glance, as JSON and as a small HTML page.

The page has no external assets. Its table is rendered on the server (so it reads right
even without JavaScript), then a few lines of script refresh it from the JSON every two
seconds, computing req/s from the change in counts.
"""

from __future__ import annotations

import html
import json
from typing import Any

__all__ = ["render_html", "render_json"]


def render_json(status: dict[str, Any]) -> bytes:
    return json.dumps(status, separators=(",", ":"), default=str).encode()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


# A pool in panic mode gets this line above its upstreams (the script is handed it too).
PANIC = "panic: every upstream is down; requests go to all of them anyway"


def _rows(status: dict[str, Any]) -> str:
    rows = []
    for pool in status["pools"]:
        if not pool["upstreams"]:
            rows.append(
                "<tr class='down'><td>{pool}</td><td colspan='9'>{text}</td></tr>".format(
                    pool=html.escape(pool["prefix"]), text=html.escape(_no_members(pool))
                )
            )
        if pool.get("panic"):
            rows.append(
                "<tr class='panic' data-panic='{pool}'><td>{pool}</td>"
                "<td colspan='9'>{text}</td></tr>".format(
                    pool=html.escape(pool["prefix"]), text=html.escape(PANIC)
                )
            )
        traffic = _traffic(pool)
        if traffic:
            rows.append(
                "<tr class='traffic'><td>{pool}</td><td colspan='9'>{text}</td></tr>".format(
                    pool=html.escape(pool["prefix"]), text=html.escape(traffic)
                )
            )
        for up in pool["upstreams"]:
            requests = up["requests"]
            rows.append(
                "<tr data-upstream='{url}' class='{state}'>"
                "<td>{pool}</td><td>{url}</td><td>{weight}</td><td class='state'>{state}</td>"
                "<td>{in_flight}</td><td class='rate'>-</td><td>{requests}</td>"
                "<td>{errors:.1%}</td><td>{p50}</td><td>{p99}</td></tr>".format(
                    pool=html.escape(pool["prefix"]),
                    url=html.escape(up["url"]),
                    weight=html.escape(f"{up['effective_weight']:g}/{up['weight']}"),
                    state=html.escape(up["state"]),
                    in_flight=up["in_flight"],
                    requests=requests,
                    errors=up["error_rate"],
                    p50=_ms(up["p50"]),
                    p99=_ms(up["p99"]),
                )
            )
    return "\n".join(rows)


def _traffic(pool: dict[str, Any]) -> str:
    """A pool's hashing, sticky-cookie and mirror counts, in one line ("" if none); the
    page's script writes the same (``traffic`` there)."""
    parts = []
    affinity = pool.get("affinity")
    if affinity:
        parts.append(
            "affinity: {keyed} keyed, {unkeyed} unkeyed, {spilled} spilled, "
            "{sticky_kept} sticky kept, {sticky_set} cookies set".format(**affinity)
        )
    mirror = pool.get("mirror")
    if mirror:
        parts.append(
            "mirror to {pool}: {sent} sent, {answered} answered, {failed} failed, "
            "{dropped} dropped, {skipped} skipped".format(**mirror)
        )
    return "; ".join(parts)


def _no_members(pool: dict[str, Any]) -> str:
    """What an empty (discovered) pool shows instead of upstreams."""
    found = pool.get("discovery")
    if found is None:
        return "no upstreams"
    problem = f"; last error: {found['error']}" if found["error"] else ""
    return f"no upstreams from {found['source']}{problem}"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rr-middleware status</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1c2430; }}
h1 {{ font-size: 1.2rem; margin: 0 0 .2rem; }}
p.meta {{ color: #5b6675; margin: 0 0 1rem; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #e3e7ec; }}
th {{ background: #f4f6f8; font-weight: 600; }}
td:nth-child(n+3) {{ font-variant-numeric: tabular-nums; }}
td.state {{ font-weight: 600; }}
tr.up td.state {{ color: #1a7f37; }}
tr.down td.state, tr.ejected td.state {{ color: #cf222e; }}
tr.probing td.state, tr.drained td.state {{ color: #9a6700; }}
tr.down, tr.ejected {{ background: #fff5f5; }}
tr.panic td {{ background: #fff8c5; color: #9a6700; font-weight: 600; }}
tr.traffic td {{ color: #5b6675; }}
</style></head>
<body>
<h1>rr-middleware</h1>
<p class="meta">Pools and upstreams, refreshed every 2 s. <span id="updated"></span></p>
<table>
<thead><tr><th>Pool</th><th>Upstream</th><th>Weight</th><th>State</th><th>In flight</th>
<th>req/s</th><th>Requests</th><th>Errors</th><th>p50</th><th>p99</th></tr></thead>
<tbody id="upstreams">
{rows}
</tbody></table>
<script>
const JSON_URL = {json_url};
const PANIC = {panic};
let last = null;
function ms(s) {{ return s === null ? "-" : Math.round(s * 1000) + " ms"; }}
function traffic(pool) {{
  const parts = [];
  const a = pool.affinity, m = pool.mirror;
  if (a) parts.push("affinity: " + a.keyed + " keyed, " + a.unkeyed + " unkeyed, " +
    a.spilled + " spilled, " + a.sticky_kept + " sticky kept, " + a.sticky_set +
    " cookies set");
  if (m) parts.push("mirror to " + m.pool + ": " + m.sent + " sent, " + m.answered +
    " answered, " + m.failed + " failed, " + m.dropped + " dropped, " + m.skipped +
    " skipped");
  return parts.join("; ");
}}
function cell(text, cls) {{
  const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; return td;
}}
async function refresh() {{
  const now = performance.now();
  const data = await (await fetch(JSON_URL, {{cache: "no-store"}})).json();
  const body = document.getElementById("upstreams");
  const rows = [];
  const seen = {{}};
  for (const pool of data.pools) {{ if (!pool.upstreams.length) {{
    const tr = document.createElement("tr"); tr.className = "down";
    const found = pool.discovery;
    const text = found ? "no upstreams from " + found.source +
      (found.error ? "; last error: " + found.error : "") : "no upstreams";
    const td = cell(text); td.colSpan = 9;
    tr.append(cell(pool.prefix), td); rows.push(tr);
  }}
  if (pool.panic) {{
    const tr = document.createElement("tr"); tr.className = "panic";
    tr.dataset.panic = pool.prefix;
    const td = cell(PANIC); td.colSpan = 9;
    tr.append(cell(pool.prefix), td); rows.push(tr);
  }}
  const summary = traffic(pool);
  if (summary) {{
    const tr = document.createElement("tr"); tr.className = "traffic";
    const td = cell(summary); td.colSpan = 9;
    tr.append(cell(pool.prefix), td); rows.push(tr);
  }}
  for (const up of pool.upstreams) {{
    const key = pool.prefix + " " + up.url;
    seen[key] = up.requests;
    let rate = "-";
    if (last && key in last.counts) {{
      rate = ((up.requests - last.counts[key]) / ((now - last.at) / 1000)).toFixed(1);
    }}
    const tr = document.createElement("tr");
    tr.className = up.state; tr.dataset.upstream = up.url;
    tr.append(cell(pool.prefix), cell(up.url), cell(up.effective_weight + "/" + up.weight),
      cell(up.state, "state"), cell(up.in_flight), cell(rate, "rate"), cell(up.requests),
      cell((up.error_rate * 100).toFixed(1) + "%"), cell(ms(up.p50)), cell(ms(up.p99)));
    rows.push(tr);
  }} }}
  body.replaceChildren(...rows);
  last = {{at: now, counts: seen}};
  document.getElementById("updated").textContent =
    "Updated " + new Date().toLocaleTimeString() + ".";
}}
refresh().catch(() => {{}});
setInterval(() => refresh().catch(() => {{}}), 2000);
</script>
</body></html>
"""


def render_html(status: dict[str, Any], json_url: str) -> bytes:
    return _PAGE.format(
        rows=_rows(status), json_url=json.dumps(json_url), panic=json.dumps(PANIC)
    ).encode()
