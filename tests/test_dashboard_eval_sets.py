"""The dashboard's eval sets: a curve per set, the change from step 0 (forgetting at a glance) and the best
step per set, and the MTP layer's speculative acceptance per set beside them, over the API and in headless
Chromium; logs written before eval sets (or without an MTP layer) still read as before."""

from __future__ import annotations

import pytest
from conftest import wait_for_plots
from fakes import FakeRun

from glmkit.dashboard import create_app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The domain set improves, the general set gets worse: forgetting. Evals at 0 (the baseline), 10, 20, 30.
DOMAIN = {0: 3.0, 10: 2.6, 20: 2.4, 30: 2.5}
GENERAL = {0: 2.0, 10: 2.05, 20: 2.1, 30: 2.25}
# The MTP layer's acceptance falls on the domain set as the trunk moves away from what it was trained against.
ACCEPTED = {0: {"val": 0.62, "general": 0.6}, 10: {"val": 0.55, "general": 0.59}, 20: {"val": 0.5, "general": 0.58},
            30: {"val": 0.48, "general": 0.58}}


def eval_set_run(folder, mtp: bool = True) -> FakeRun:
    fake = FakeRun(folder, total_steps=30)
    fake.start()
    fake.evaluate_sets(0, {"val": DOMAIN[0], "general": GENERAL[0]}, acceptance=ACCEPTED[0] if mtp else None)
    for step in range(1, 31):
        fake.train(step)
        if step % 10 == 0:
            fake.evaluate_sets(step, {"val": DOMAIN[step], "general": GENERAL[step]},
                               acceptance=ACCEPTED[step] if mtp else None)
    return fake


def stats(run):
    client = create_app(run.logs_dir, min_poll_interval=0).test_client()
    return client, client.get("/api/stats").get_json()


def test_stats_per_set_change_from_step_0_and_best_after_it(tmp_path):
    client, s = stats(eval_set_run(tmp_path / "run"))
    by_name = {row["name"]: row for row in s["eval_sets"]}
    assert [row["name"] for row in s["eval_sets"]] == ["val", "general"] and s["select_by"] == "val"
    val, general = by_name["val"], by_name["general"]
    assert (val["baseline_loss"], val["latest_loss"], val["best_loss"], val["best_step"]) == (3.0, 2.5, 2.4, 20)
    assert val["change"] == pytest.approx(-0.5) and val["change_pct"] == pytest.approx(-100 / 6)
    # The general set's best is after step 0 even though step 0 was lower: no adapter exists at step 0.
    assert (general["best_step"], general["best_loss"]) == (10, 2.05) and general["change"] == pytest.approx(0.25)
    assert val["selected"] and not general["selected"]
    assert (s["best_val_loss"], s["best_val_step"]) == (2.4, 20)  # the cards: the selection set, not step 0
    summaries = [e["summary"] for e in client.get("/api/events").get_json()["events"] if e["event"] == "eval"]
    assert summaries[:2] == ["Baseline evaluation (base model): val 3.0000, general 2.0000",
                             "Evaluation: val 2.6000, general 2.0500"]
    png = client.get("/api/plots/eval_sets.png")
    assert png.status_code == 200 and png.data.startswith(PNG_MAGIC)


def test_mtp_acceptance_per_set_and_its_change_from_step_0(tmp_path):
    client, s = stats(eval_set_run(tmp_path / "run"))
    by_name = {row["name"]: row for row in s["eval_sets"]}
    assert (by_name["val"]["baseline_acceptance"], by_name["val"]["latest_acceptance"]) == (0.62, 0.48)
    assert by_name["val"]["acceptance_change"] == pytest.approx(-0.14)
    assert by_name["general"]["acceptance_change"] == pytest.approx(-0.02)
    assert by_name["val"]["latest_mtp_loss"] == pytest.approx(3.5)
    png = client.get("/api/plots/mtp.png")
    assert png.status_code == 200 and png.data.startswith(PNG_MAGIC)
    _, without = stats(eval_set_run(tmp_path / "no-mtp", mtp=False))  # no MTP layer: nothing to show
    assert all(row["latest_acceptance"] is None and row["acceptance_change"] is None for row in without["eval_sets"])


def test_a_log_from_before_eval_sets_reads_as_the_set_val(tmp_path):
    old = FakeRun(tmp_path / "old", total_steps=30)
    old.start()
    old.steps(1, 30, eval_every=10)  # val_loss / perplexity / val_tokens only, no step 0
    client, s = stats(old)
    assert [row["name"] for row in s["eval_sets"]] == ["val"]
    row = s["eval_sets"][0]
    assert row["evals"] == 3 and row["baseline_loss"] is None and row["change"] is None
    assert (row["best_step"], row["best_loss"]) == (s["best_val_step"], s["best_val_loss"])
    assert client.get("/api/plots/eval_sets.png").status_code == 200


def test_resume_supersedes_each_sets_rows(tmp_path):
    fake = eval_set_run(tmp_path / "run")
    fake.event("resume", 20, from_step=20)
    fake.train(21, when=fake.tick())  # the killed attempt's eval at 30 is superseded until rewritten
    _, s = stats(fake)
    assert {row["name"]: row["latest_step"] for row in s["eval_sets"]} == {"val": 20, "general": 20}


def test_eval_sets_in_browser(tmp_path, serve_dashboard, chromium):
    fake = eval_set_run(tmp_path / "run")
    page = chromium()
    errors = []
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    page.goto(serve_dashboard(fake.logs_dir).url + "/")
    page.wait_for_function("() => document.querySelectorAll('#evalsets-rows tr').length === 2")
    rows = page.locator("#evalsets-rows tr")
    assert rows.nth(0).get_attribute("data-set") == "val" and "selects best" in rows.nth(0).text_content()
    general = page.locator('#evalsets-rows tr[data-set="general"]')
    assert general.locator(".baseline").text_content() == "2.0000"
    assert general.locator(".latest").text_content() == "2.2500"
    assert general.locator(".change").text_content() == "+0.2500 (+12.5%)"
    assert "trend-up" in general.locator(".change").get_attribute("class")  # worse than the base: red
    assert general.locator(".best-step").text_content() == "10"
    val = page.locator('#evalsets-rows tr[data-set="val"]')
    assert val.locator(".change").text_content() == "−0.5000 (−16.7%)"
    assert val.locator(".best-step").text_content() == "20"
    assert page.text_content("#val-best-step").strip() == "step 20"
    assert val.locator(".mtp").text_content() == "48.0% (−14.0 pt)"  # fewer drafts accepted: red
    assert "trend-up" in val.locator(".mtp").get_attribute("class")
    assert general.locator(".mtp").text_content() == "58.0% (−2.0 pt)"
    assert page.locator("#mtp-plot").is_visible()
    wait_for_plots(page)
    sizes = page.evaluate("() => ['eval_sets', 'mtp'].map(n => { const i = document.querySelector(`img[data-plot=${n}]`);"
                          " return [i.naturalWidth, i.naturalHeight]; })")
    assert sizes == [[1664, 416], [1664, 416]]
    assert not errors, errors


@pytest.mark.parametrize("low, high", [(0.001, 0.003), (0.3, 0.65)])
def test_acceptance_axes_never_label_two_ticks_the_same(low, high):
    """The tiny demo model's MTP layer accepts about 0.1% of drafts: whole-percent ticks read 0%, 0%, 0% (seen in
    a fresh clone's `make demo`). The labels carry as many decimals as the tick spacing needs."""
    import numpy as np
    from matplotlib.figure import Figure

    from glmkit.dashboard.plots import _draw_acceptance

    fig = Figure()
    y = np.linspace(low, high, 5)
    _draw_acceptance(fig, fig.add_subplot(), {"val": {"x": np.arange(0, 50, 10), "y": y, "baseline": y[0]}})
    for ax in fig.axes:
        labels = [ax.yaxis.get_major_formatter()(tick) for tick in ax.get_yticks()]
        assert len(set(labels)) == len(labels), labels
    shown = [fig.axes[0].yaxis.get_major_formatter()(tick) for tick in fig.axes[0].get_yticks()]
    assert all(label.endswith("%") for label in shown) and ("30%" in shown or "0.10%" in shown), shown


@pytest.mark.parametrize("steps, losses, best", [([0], [7.67], None), ([0, 10, 20], [7.0, 7.5, 7.3], 20)])
def test_the_validation_plots_best_star_is_never_step_0(steps, losses, best):
    """While only the step-0 baseline existed, the plot starred it as best where the card said "after the first
    update" (seen in `make demo`): the base model has no adapter to keep, so the star skips it, as the cards do."""
    import numpy as np
    from matplotlib.figure import Figure

    from glmkit.dashboard.plots import _draw_validation

    ax = Figure().add_subplot()
    x, y = np.array(steps), np.array(losses)
    _draw_validation(ax, {"val": {"x": x, "y": y}, "ppl": {"x": x, "y": np.exp(y)}})
    stars = [line for line in ax.get_lines() if line.get_label() == "best"]
    assert [int(line.get_xdata()[0]) for line in stars] == ([best] if best is not None else [])
