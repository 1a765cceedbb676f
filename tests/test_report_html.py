"""`evo report`: a self-contained HTML page with plots, lineage, guard verdicts and operator numbers,
built from a real run directory (the fake executor plays the training; the store, guard and
engine are the real ones)."""

from __future__ import annotations

import base64
import io
import re
import threading
from html import escape

import numpy as np
import pytest
from PIL import Image

from evo import cli
from evo.executors.fake import FakeExecutor
from evo.lock import RunLock
from evo.report_html import TITLES, write_report
from evo.run_facts import operator_rows, read_run, time_facts
from evo.store import RunStore
from tests.fakes import by_quality, engine_with, quality
from trainer.runner import RunResult

IMG = re.compile(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'[^>]*data-file='([\w.]+)'")


def crashes_far_from_one(job) -> RunResult:
    """Children far from the stand-in's best QUALITY crash: the report must show failures too."""
    if abs(1.0 - quality(job.code)) > 0.6:
        return RunResult(status="crash", reason="stand-in crash", wall_seconds=0.5)
    result = by_quality(job, noise=0.01)
    result.wall_seconds = 1.0
    return result


GUARDED = {"enabled": True, "noise_runs": 3, "reruns": 3, "z": 2.0, "min_delta": 0.001}


@pytest.fixture
def finished_run(setup_run):
    engine, run_dir = engine_with(setup_run, FakeExecutor(crashes_far_from_one, slots=2), max_evaluations=14,
                                  workers=2, guard=GUARDED, mutators={"perturb": {"max_changes": 1}})
    engine.run()
    return run_dir


def pixel_spread(png: bytes) -> float:
    """Standard deviation of the grey levels: about 0 for a blank or single-colour image."""
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float).std())


def test_report_is_one_self_contained_page_with_every_section_and_nonblank_plots(finished_run, tmp_path):
    page = write_report(finished_run, tmp_path / "report")
    html = page.read_text()
    for title in TITLES.values():
        assert f"<h2>{title.replace(chr(39), '&#x27;')}</h2>" in html
    images = IMG.findall(html)
    assert sorted(name for _, name in images) == ["family_tree.png", "progress.png"]
    for data, name in images:
        png = base64.b64decode(data)
        assert png == (tmp_path / "report" / name).read_bytes()  # the same picture beside the page
        width, height = Image.open(io.BytesIO(png)).size
        assert width > 400 and height > 200
        assert pixel_spread(png) > 10, f"{name} looks blank"
    # Nothing is fetched: no external script, style sheet or image.
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", html)
    assert "<script" not in html and "<link" not in html


def test_report_shows_the_guard_numbers_and_the_champions_lineage_with_diffs(finished_run, tmp_path):
    html = write_report(finished_run, tmp_path).read_text()
    facts = read_run(finished_run)
    guard = facts.guard
    assert len(guard.champions) >= 2  # a QUALITY step is worth far more than the noise: something was promoted
    assert f"sigma <b>{guard.sigma():.4f}</b>" in html
    for record in guard.records.values():  # every verdict with its numbers
        stats = record.stats()
        row = html[html.index(f"<td>{record.id}</td>"):]
        row = row[:row.index("</tr>")]
        assert f"{stats['val_mean']:.4f} ± {stats['val_std']:.4f}" in row
        assert f"{stats['held_mean']:.4f} ± {stats['held_std']:.4f}" in row
        assert (record.verdict or "awaiting re-runs") in row
    lineage = html[html.index("id='lineage'"):html.index("id='tree'")]
    champion = facts.population.individuals[guard.champions[-1]]
    chain = [i.id for i in reversed(facts.population.lineage(champion.id))]
    assert chain[0] == "v00001" and chain[-1] == champion.id
    positions = [lineage.index(f"<h3>{i} ") for i in chain]
    assert positions == sorted(positions)  # from the seed down to the champion
    assert champion.hypothesis and escape(champion.hypothesis) in lineage  # as the page escapes it
    # Each step's diff against its parent, lines coloured: every child changed something, and the
    # line's gain (scores follow QUALITY alone) must show a QUALITY change somewhere.
    assert lineage.count("<span class='add'>+") >= len(chain) - 1
    assert lineage.count("<span class='del'>-") >= len(chain) - 1
    assert "<span class='add'>+QUALITY = " in lineage


def test_operator_and_time_tables_count_what_the_run_recorded(finished_run):
    facts = read_run(finished_run)
    rows = {r["operator"]: r for r in operator_rows(facts)}
    individuals = facts.population.individuals.values()
    for name, row in rows.items():
        mine = [i for i in individuals if i.operator == name]
        assert row["evaluated"] == len(mine)
        assert row["ok"] == sum(i.status == "ok" for i in mine)
        assert row["proposed"] == facts.counters.proposed.get(name, 0)
        assert row["refused"] == sum(facts.counters.refusals.get(name, {}).values())
    assert sum(r["promoted"] for r in rows.values()) == len(facts.guard.champions) - 1
    assert rows["seed"]["evaluated"] == 1
    times = time_facts(facts)
    by_status = {status: (count, seconds) for status, count, seconds in times["by_status"]}
    crashed = facts.counters.by_status.get("crash", 0)
    assert crashed > 0, "the scripted crashes should have happened"
    assert by_status["crash"] == (crashed, pytest.approx(0.5 * crashed))
    assert by_status["ok"] == (facts.counters.by_status["ok"], pytest.approx(1.0 * facts.counters.by_status["ok"]))
    assert times["guard_runs"] == facts.counters.guard_runs > 0


def test_what_a_variant_wrote_is_escaped(finished_run, tmp_path):
    # Hypotheses come from LLM replies and diffs from variants: neither may inject markup.
    store = RunStore(finished_run)
    individuals, state = store.load()
    champion = state["guard"]["champions"][-1]
    for individual in individuals:
        if individual.id == champion:
            individual.hypothesis = "<img src=x onerror=alert(1)> faster & better"
    store.save(individuals, state)
    html = write_report(finished_run, tmp_path).read_text()
    assert "&lt;img src=x onerror=alert(1)&gt; faster &amp; better" in html
    assert "<img src=x" not in html


def test_report_reads_a_run_that_is_still_going_without_its_lock(setup_run, tmp_path):
    engine, run_dir = engine_with(setup_run, FakeExecutor(crashes_far_from_one, slots=2, seconds=0.2),
                                  max_evaluations=30, workers=2, guard=GUARDED)
    finished = threading.Event()
    worker = threading.Thread(target=lambda: (engine.run(), finished.set()), daemon=True)
    with RunLock(run_dir):  # held as `evo run` holds it: the report must not need it
        worker.start()
        during = 0  # reports finished while the engine was still checkpointing
        while worker.is_alive():
            page = write_report(run_dir, tmp_path / f"live{during}")
            assert TITLES["lineage"].replace("'", "&#x27;") in page.read_text()
            during += worker.is_alive()
        worker.join(timeout=60)
    assert finished.is_set(), "the engine did not finish cleanly while being reported on"
    assert during >= 1
    assert "awaiting re-runs" not in write_report(run_dir, tmp_path / "final").read_text()  # every verdict given


def test_evo_report_command_prints_where_the_report_is(finished_run, tmp_path, capsys):
    assert cli.main(["report", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert f"{finished_run / 'report' / 'report.html'}" in out
    assert (finished_run / "report" / "progress.png").is_file()
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "evo report: error:" in err and "not an evo run directory" in err


@pytest.mark.slow  # two Chromium starts: tens of seconds on a busy machine
def test_report_renders_in_a_headless_browser_with_every_plot_drawn(finished_run, tmp_path):
    from tests import browser

    chromium = browser.chromium()
    page = write_report(finished_run, tmp_path / "report")
    alone = tmp_path / "alone"  # a folder with the HTML only: the plots must come from the page itself
    alone.mkdir()
    probed = browser.probed_copy(page, alone)
    dom = browser.dump_dom(chromium, probed, tmp_path / "profile")
    for title in TITLES.values():
        assert re.search(rf"<h2>{re.escape(title)}</h2>", dom), f"section {title!r} missing from the rendered page"
    images = re.findall(r"<img [^>]*data-file=\"([\w.]+)\"[^>]*data-natural=\"(\d+)x(\d+)\"[^>]*data-box=\"([\d,-]+)\"", dom)
    assert sorted(name for name, *_ in images) == ["family_tree.png", "progress.png"], dom[:3000]
    height = int(re.search(r'data-page-height="(\d+)"', dom).group(1))
    shot = browser.screenshot(chromium, probed, tmp_path / "profile", tmp_path / "shot.png", height=height)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10, "the page rendered blank"
    for name, natural_w, natural_h, box in images:
        assert int(natural_w) > 400 and int(natural_h) > 200, f"{name} did not decode"
        left, top, width, height = (int(v) for v in box.split(","))
        region = pixels[top:top + height, left:left + width]
        assert region.size and region.shape[0] > 100, f"{name} sits outside the screenshot ({box})"
        assert region.std() > 10, f"{name}'s region of the screenshot is blank"


def test_a_run_without_the_guard_or_without_results_still_gets_a_report(setup_run, tmp_path):
    engine, run_dir = engine_with(setup_run, FakeExecutor(crashes_far_from_one), max_evaluations=4)
    empty = write_report(run_dir, tmp_path / "empty").read_text()  # checkpointed, nothing evaluated yet
    assert "No variant has been evaluated successfully yet." in empty
    assert len(IMG.findall(empty)) == 2  # both plots are drawn, empty ones saying so
    engine.run()
    html = write_report(run_dir, tmp_path / "done").read_text()
    assert "The guard was off in this run" in html
    best = read_run(run_dir).population.best()
    assert f"<h3>{best.id} " in html  # the lineage follows the best first draw when nobody was re-run
