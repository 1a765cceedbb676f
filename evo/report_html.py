"""`evo report RUN_DIR`: one self-contained report.html (plots embedded as base64) and the PNGs beside it.

It opens from disk in any browser, with no server and nothing fetched. It works on a finished run
and on one still going: the checkpoint is read without the run's lock, as `evo status` reads it.
Everything taken from the run (ids, hypotheses, code) is HTML-escaped: variants and LLM replies
wrote it.
"""

from __future__ import annotations

import base64
import time
from html import escape
from pathlib import Path

from evo import plots
from evo.report import champion_lines
from evo.run_facts import (RunFacts, champion_steps, evaluations, family, guard_rows, lineage_steps, operator_rows,
                           read_run, time_facts)
from evo.progress import clock
from trainer.files import write_atomic

# Section titles, in page order (the browser test looks for each).
TITLES = {
    "progress": "val_bpb over time",
    "guard": "Noise floor and guard verdicts",
    "lineage": "The champion's lineage",
    "tree": "Family tree",
    "operators": "Operators",
    "time": "Where the time went",
}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .muted { color: #777; } pre.summary { background: #f8f8f8; padding: 8px; }
.step { border-left: 3px solid #2ca02c; padding-left: 12px; margin: 16px 0; }
pre.diff { background: #fafafa; border: 1px solid #eee; padding: 6px; font-size: 12px; overflow-x: auto; }
.add { color: #116611; background: #e6ffec; } .del { color: #aa1111; background: #ffebe9; }
.hunk { color: #555; background: #eef3ff; } .meta { color: #777; }
"""


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Writes report.html and its PNGs into out_dir (default RUN_DIR/report); returns report.html's path."""
    facts = read_run(run_dir)
    out = Path(out_dir) if out_dir else facts.store.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    end_minutes = facts.counters.elapsed_seconds / 60
    images = {
        "progress.png": plots.progress(evaluations(facts), champion_steps(facts), end_minutes),
        "family_tree.png": plots.family_tree(family(facts), facts.population.n_islands),
    }
    for name, png in images.items():
        write_atomic(out / name, png)
    page = render(facts, images)
    write_atomic(out / "report.html", page.encode())
    return out / "report.html"


def render(facts: RunFacts, images: dict[str, bytes]) -> str:
    c = facts.counters
    pending = facts.population.pending()
    body = [
        f"<h1>evo report: {escape(str(facts.store.dir))}</h1>",
        f"<p class='muted'>A snapshot of the checkpoint taken {escape(time.strftime('%Y-%m-%d %H:%M:%S'))}"
        + (f"; {len(pending)} evaluation(s) in flight or queued, so the run may still be going" if pending else "")
        + ".</p>",
        f"<p>evaluations: {c.evaluations} &middot; births: {c.births} &middot; duplicates skipped: {c.duplicates}"
        f" &middot; guard re-runs: {c.guard_runs} &middot; time used: {escape(clock(c.elapsed_seconds))}"
        f" &middot; data: <code>{escape(str(facts.info.get('data_fingerprint', '?')))}</code></p>",
        f"<pre class='summary'>{escape(chr(10).join(champion_lines(facts.population, facts.guard, facts.store)))}</pre>",
        _section("progress", _img(images, "progress.png", TITLES["progress"]),
                 "<p class='muted'>Each point is a child's first evaluation. The green line is the champion's "
                 "mean over the guard's re-runs on its seeds (band: ± one standard deviation), from when it "
                 "was promoted; the dashed line is its held-out mean. Held-out is scored only in the guard's "
                 f"re-runs and read only to veto a promotion {escape(facts.guard.heldout_note())}.</p>"),
        _section("guard", _guard_html(facts)),
        _section("lineage", _lineage_html(facts)),
        _section("tree", _img(images, "family_tree.png", TITLES["tree"])),
        _section("operators", _operators_html(facts)),
        _section("time", _time_html(facts)),
    ]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>evo report: {escape(facts.store.dir.name)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _section(key: str, *parts: str) -> str:
    return f"<section id='{key}'><h2>{escape(TITLES[key])}</h2>\n" + "\n".join(parts) + "</section>"


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    data = base64.b64encode(images[name]).decode()
    return f"<img src='data:image/png;base64,{data}' alt='{escape(alt)}' data-file='{escape(name)}'>"


def _num(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    lines = ["".join(f"<td class='n'>{cell}</td>" if k in numeric else f"<td>{cell}</td>" for k, cell in enumerate(row))
             for row in rows]
    return f"<table><tr>{head}</tr>" + "".join(f"<tr>{line}</tr>" for line in lines) + "</table>"


def _guard_html(facts: RunFacts) -> str:
    sigma = facts.guard.sigma()
    s = facts.guard.s
    intro = (f"<p>noise floor: sigma <b>{_num(sigma)}</b> val_bpb: the spread of one variant's runs across the guard's seeds (the seed's noise runs, pooled with every candidate's re-runs). "
             if sigma is not None else "<p>noise floor: not measured yet (the seed's re-runs have not finished). ")
    intro += (f"A child becomes a candidate when its first draw beats the champion's on the same evaluation seed by "
              f"more than max(min_delta {s.min_delta:g}, z {s.z:g} × sigma); it is promoted when {s.reruns} re-runs on "
              f"the champion's seeds give p &lt; {s.alpha:g} (one-sided paired t-test, seed by seed), a gain of at "
              f"least min_delta, and a better held-out mean on the same seeds.</p>")
    if not s.enabled:
        return "<p>The guard was off in this run: no re-runs, no noise floor, no verdicts.</p>"
    rows = [[escape(r["id"]), escape(r["operator"]), _num(r["first_val"]), f"{r['ok']}/{r['done']} of {r['expected']}",
             f"{_num(r['val_mean'])} ± {_num(r['val_std'])}", f"{_num(r['held_mean'])} ± {_num(r['held_std'])}",
             "–" if r["p_value"] is None else f"{r['p_value']:.3g}", escape(r["verdict"])] for r in guard_rows(facts)]
    table = _table(["id", "operator", "first draw", "re-runs ok", "val re-run mean ± std", "held-out mean ± std",
                    "p", "verdict"], rows, numeric={2, 3, 4, 5, 6})
    chain = " → ".join(escape(i) for i in facts.guard.champions) or "none yet"
    return intro + table + f"<p>champions, oldest first: {chain}</p>"


def _lineage_html(facts: RunFacts) -> str:
    steps = lineage_steps(facts)
    if not steps:
        return "<p>No variant has been evaluated successfully yet.</p>"
    parts = ["<p class='muted'>From the seed down to the champion, each child's first parent; the diff is "
             "against that parent.</p>"]
    for step in steps:
        parents = " + ".join(escape(p) for p in step["parents"]) or "none (the seed)"
        score = (f"{_num(step['score'])} ({escape(step['score_label'])}; first draw {_num(step['val_bpb'])})"
                 if step["score"] is not None else "not scored")
        parts.append(
            f"<div class='step'><h3>{escape(step['id'])} <span class='muted'>by {escape(step['operator'])} from "
            f"{parents}</span></h3><p>val_bpb {score}"
            + (f" &middot; guard: {escape(step['verdict'])}" if step["verdict"] else "") + "</p>"
            + (f"<p>hypothesis: {escape(step['hypothesis'])}</p>" if step["hypothesis"] else "")
            + (_diff_html(step["diff"]) if step["diff"] else "") + "</div>")
    return "\n".join(parts)


def _diff_html(lines: list[str]) -> str:
    out = []
    for line in lines:
        kind = ("meta" if line.startswith(("---", "+++")) else "add" if line.startswith("+")
                else "del" if line.startswith("-") else "hunk" if line.startswith("@@") else "")
        text = escape(line)
        out.append(f"<span class='{kind}'>{text}</span>" if kind else text)
    return "<pre class='diff'>" + "\n".join(out) + "</pre>"


def _operators_html(facts: RunFacts) -> str:
    rows = []
    for r in operator_rows(facts):
        reasons = "<br>".join(f"{escape(reason)} (×{count})" for reason, count in r["refusals"]) or "–"
        rows.append([escape(r["operator"]), str(r["proposed"]), str(r["refused"]), reasons, str(r["evaluated"]),
                     str(r["ok"]), str(r["improved"]), str(r["promoted"]), f"{r['llm_tokens']:,}" if r["llm_tokens"] else "–",
                     _num(r["llm_latency_s"], 1)])
    return _table(["operator", "proposed", "refused", "refused because", "evaluated", "ok", "improved on parent",
                   "promoted", "LLM tokens", "LLM latency (s, mean)"], rows, numeric={1, 2, 4, 5, 6, 7, 8, 9})


def _time_html(facts: RunFacts) -> str:
    t = time_facts(facts)
    busy = "–" if t["busy_fraction"] is None else f"{t['busy_fraction']:.0%}"
    guard = (f"{t['guard_runs']} guard re-runs" + (f", {t['guard_seconds']:.0f} s over the {t['guard_timed']} with a result file"
                                                    if t["guard_timed"] else " (no result files with their times)"))
    intro = (f"<p>run time {escape(clock(t['elapsed_seconds']))} on {t['workers']} worker(s); workers busy "
             f"<b>{busy}</b> of it (first evaluations and guard re-runs, over run time × workers). {guard}.</p>")
    rows = [[escape(status), str(count), f"{seconds:.0f}"] for status, count, seconds in t["by_status"]]
    return intro + _table(["status of first evaluation", "evaluations", "wall seconds"], rows, numeric={1, 2})
