"""Orthanc Explorer's Lookalike panel in a real browser, clicked as a radiologist clicks.

Debian's chromium, driven by playwright through ``executable_path`` (no browser download), against the real stack:
Orthanc Explorer as Orthanc serves it, with the plugin's extension. What the page shows is read from the page
(the study's own UID in Orthanc Explorer's study panel, the result rows); where a report went is checked in Orthanc.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from lookalike.ops.stack import Stack, StackConfig
from tests.support import Explorer, identities, store_floor_corpus, store_lookup_corpus

pytestmark = pytest.mark.stack

@pytest.fixture(scope="module")
def corpus(stack: Stack, tmp_path_factory) -> dict:
    return store_lookup_corpus(stack, tmp_path_factory.mktemp("browser"), "PBRW", (7, 9, 11))


@pytest.fixture
def explorer(page, stack: Stack, corpus: dict) -> Explorer:
    return Explorer(page, stack, corpus)


def test_a_result_opens_the_study_it_names_and_back_returns(explorer: Explorer, corpus: dict) -> None:
    explorer.open("a")
    rows = explorer.look_up()
    assert rows[0] == corpus["ids"]["b"] and corpus["ids"]["a"] not in rows
    explorer.page.click(f".lookalike-result[data-study='{rows[0]}'] a.lookalike-open")
    explorer.wait_shown("b")
    assert str(corpus["ds"]["a"].StudyInstanceUID) not in explorer.shown_study_uid()
    assert explorer.rows() == []  # study A's answers are not shown on study B's page
    explorer.page.go_back()
    explorer.wait_shown("a")
    assert explorer.rows() == []
    assert explorer.look_up()[0] == corpus["ids"]["b"]


def test_the_report_lands_in_the_study_on_screen(explorer: Explorer, corpus: dict, stack: Stack) -> None:
    assert explorer.lookalike_reports("prior") == [] and explorer.lookalike_reports("other") == []
    explorer.open("prior")
    first = explorer.look_up()[0]
    explorer.page.click(f".lookalike-result[data-study='{first}'] a.lookalike-open")
    explorer.page.go_back()
    explorer.wait_shown("prior")
    filed = explorer.file_report()
    [report] = explorer.lookalike_reports("prior")
    assert report.StudyInstanceUID == corpus["ds"]["prior"].StudyInstanceUID
    assert report.PatientID == corpus["ds"]["prior"].PatientID
    assert explorer.lookalike_reports("other") == [] and first != corpus["ids"]["prior"]
    assert report.SeriesDate and report.SeriesTime
    # The page says where the report went: a link to its series in this study.
    series_id = filed["href"].split("uuid=")[1]
    series = stack.http().get(f"{stack.config.orthanc_url}/series/{series_id}", timeout=10).json()
    assert series["ParentStudy"] == corpus["ids"]["prior"]
    assert series["MainDicomTags"]["SeriesInstanceUID"] == report.SeriesInstanceUID
    explorer.page.click(".lookalike-report-link")
    explorer.page.wait_for_function("id => $.mobile.activePage.attr('id') == 'series' && "
                                    "location.hash.indexOf(id) >= 0", arg=series_id)
    assert "Lookalike similar cases" in explorer.page.inner_text("#series")


def test_after_following_a_result_the_report_goes_to_that_study(explorer: Explorer, corpus: dict,
                                                               stack: Stack) -> None:
    explorer.open("other")
    rows = explorer.look_up()
    target = next(name for name in ("a", "b", "prior") if corpus["ids"][name] == rows[0])
    explorer.page.click(f".lookalike-result[data-study='{rows[0]}'] a.lookalike-open")
    explorer.wait_shown(target)
    filed = explorer.file_report()
    series = stack.http().get(f"{stack.config.orthanc_url}/series/{filed['href'].split('uuid=')[1]}",
                              timeout=10).json()
    assert series["ParentStudy"] == corpus["ids"][target]
    reports = explorer.lookalike_reports(target)
    assert series["MainDicomTags"]["SeriesInstanceUID"] in {r.SeriesInstanceUID for r in reports}
    assert {r.PatientID for r in reports} == {corpus["ds"][target].PatientID}
    assert explorer.lookalike_reports("other") == []


def test_filing_the_same_answer_again_points_to_the_report_filed_before(explorer: Explorer) -> None:
    explorer.open("b")
    before = len(explorer.lookalike_reports("b"))
    explorer.look_up()
    first = explorer.file_report()
    # an earlier test may have filed this very answer already (it follows the top result, which may be "b")
    filed = before if first["status"].startswith("Already filed on") else before + 1
    assert len(explorer.lookalike_reports("b")) == filed
    explorer.page.evaluate("$('#lookalike-status').empty()")
    again = explorer.file_report()
    assert again["href"] == first["href"] and again["status"].startswith("Already filed on")
    assert len(explorer.lookalike_reports("b")) == filed


def test_a_late_answer_for_the_previous_study_is_not_shown(explorer: Explorer, corpus: dict) -> None:
    held = []  # study A's lookup, held back by the network until the user is on another study
    explorer.page.route(f"**/lookalike/studies/{corpus['ids']['a']}/similar*", lambda route: held.append(route))
    explorer.open("a")
    explorer.page.evaluate("window.lookupsDone = 0; $(document).ajaxComplete(function(e, xhr, settings) {"
                           " if (settings.url.indexOf('/similar') >= 0) window.lookupsDone++; })")
    explorer.page.click("#lookalike-find")
    for _ in range(200):
        if held:
            break
        explorer.page.wait_for_timeout(50)
    assert len(held) == 1
    explorer.page.goto(f"{explorer.url}#study?uuid={corpus['ids']['other']}")  # the address bar, same document
    explorer.wait_shown("other")
    held[0].continue_()
    explorer.page.wait_for_function("window.lookupsDone == 1")  # A's answer has reached the page's code
    assert explorer.rows() == []
    assert "most similar" not in explorer.page.inner_text("#lookalike-status")
    rows = explorer.look_up()
    assert corpus["ids"]["other"] not in rows and rows


def test_patient_scope_lists_this_patients_priors_only(explorer: Explorer, corpus: dict) -> None:
    explorer.open("a")
    assert len(explorer.look_up()) >= 3
    explorer.choose_scope("This patient's earlier studies")
    assert explorer.rows() == []  # the list shown is always the answer for the scope chosen
    assert explorer.look_up() == [corpus["ids"]["prior"]]
    assert explorer.page.inner_text(".lookalike-patient") == "this patient"
    explorer.choose_scope("All patients")
    assert len(explorer.look_up()) >= 3


def test_the_page_shows_images_side_by_side_and_no_other_patients_identity(explorer: Explorer, corpus: dict,
                                                                             stack: Stack) -> None:
    explorer.open("a")
    explorer.look_up()
    panel = explorer.page.inner_text("#lookalike-panel")
    for identity in identities(corpus, "b", "other"):
        assert identity not in panel
    first = explorer.page.locator(".lookalike-result").first
    assert first.locator(".lookalike-patient").inner_text() == "another patient"
    assert first.locator(".lookalike-rank").inner_text() == "1"
    shown = [float(t) for t in explorer.page.locator(".lookalike-result .lookalike-score").all_inner_texts()]
    assert shown == sorted(shown, reverse=True) and shown[0] > shown[1] + 0.1  # the near copy stands apart
    assert "US" in first.inner_text() and "2024-06-11" in first.inner_text()
    sources = first.locator("img").evaluate_all("imgs => imgs.map(i => i.getAttribute('src'))")
    instances = [src.split("/instances/")[1].split("/")[0] for src in sources]
    http, url = stack.http(), stack.config.orthanc_url
    sops = [http.get(f"{url}/instances/{i}", timeout=10).json()["MainDicomTags"]["SOPInstanceUID"] for i in instances]
    assert sops == [corpus["ds"]["a"].SOPInstanceUID, corpus["ds"]["b"].SOPInstanceUID]
    explorer.page.wait_for_function(
        "() => $('.lookalike-result:first img').toArray().every(i => i.complete && i.naturalWidth > 0)")


def test_the_lesions_each_match_was_made_from_are_outlined_on_both_images(explorer: Explorer, corpus: dict,
                                                                          stack: Stack) -> None:
    """Where the lesion finder found a lesion, its box is drawn over that image at the place it covers in the
    stored pixels (read from Orthanc's Rows and Columns, not from the page); an image without one has no outline."""
    explorer.open("a")
    explorer.look_up()
    http, url = stack.http(), stack.config.orthanc_url
    answer = http.get(f"{url}/lookalike/studies/{corpus['ids']['a']}/similar", params={"limit": 10},
                      timeout=30).json()
    expected = {}
    for s in answer["similar"]:
        match = s["best_match"]
        expected[(s["orthanc_study_id"], 0)] = (match["query_orthanc_instance_id"], match["query_lesion_box"])
        expected[(s["orthanc_study_id"], 1)] = (match["orthanc_instance_id"], match["lesion_box"])
    assert any(box for _, box in expected.values()), "the corpus should hold a lesion the finder finds"
    explorer.page.wait_for_function(
        "() => $('.lookalike-result img').toArray().every(i => i.complete && i.naturalWidth > 0)")
    drawn = explorer.page.eval_on_selector_all(".lookalike-result", """rows => rows.flatMap(r =>
        Array.from(r.querySelectorAll('.lookalike-image')).map((f, i) => {
          const img = f.querySelector('img').getBoundingClientRect(), o = f.querySelector('.lookalike-lesion');
          const box = o && o.getBoundingClientRect();
          return [r.dataset.study, i, [img.width, img.height],
                  box && [box.left - img.left, box.top - img.top, box.right - img.left, box.bottom - img.top]];
        }))""")
    assert len(drawn) == len(expected)
    for study, column, (width, height), outline in drawn:
        instance, box = expected[(study, column)]
        if box is None:
            assert outline is None
            continue
        tags = http.get(f"{url}/instances/{instance}/simplified-tags", timeout=10).json()
        sx, sy = width / int(tags["Columns"]), height / int(tags["Rows"])
        assert outline == pytest.approx([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], abs=1.5)


def test_a_site_that_discloses_other_patients_sees_them(browser, tmp_path: Path) -> None:
    """``disclose_other_patients`` in Orthanc's "Lookalike" section opens up the REST answer and the page."""
    config = StackConfig.create(tmp_path / "stack", extra_settings={"disclose_other_patients": True})
    with Stack(config) as disclosing:
        corpus = store_lookup_corpus(disclosing, tmp_path, "PDSC", (7, 9, 11))
        http, url = disclosing.http(), disclosing.config.orthanc_url
        answer = http.get(f"{url}/lookalike/studies/{corpus['ids']['a']}/similar?limit=1", timeout=30).json()
        first = answer["similar"][0]
        assert first["orthanc_study_id"] == corpus["ids"]["b"]
        assert [first["patient_id"], first["patient_name"], first["accession_number"]] == identities(corpus, "b")
        context = browser.new_context(http_credentials={"username": "admin",
                                                        "password": disclosing.config.admin_password})
        try:
            explorer = Explorer(context.new_page(), disclosing, corpus)
            explorer.open("a")
            explorer.look_up()
            shown = explorer.page.locator(".lookalike-result").first.locator(".lookalike-patient").inner_text()
            assert corpus["ds"]["b"].PatientID in shown and str(corpus["ds"]["b"].PatientName) in shown
        finally:
            context.close()


@pytest.fixture(scope="module")
def floor_corpus(stack: Stack, tmp_path_factory) -> dict:
    return store_floor_corpus(stack, tmp_path_factory.mktemp("browser-floor"), "PBFL")


def test_no_similar_study_found_when_nothing_reaches_the_floor(explorer: Explorer, floor_corpus: dict) -> None:
    """Issue 17 item 2: the patient's only earlier study scores far below the model's floor (its later, alike study
    is no prior): no row, and the page says no similar study was found, with the floor."""
    explorer.corpus = floor_corpus
    explorer.open("q")
    explorer.choose_scope("This patient's earlier studies")
    assert explorer.look_up() == []
    said = explorer.page.inner_text("#lookalike-status")
    assert "No similar study found" in said and "floor" in said


def test_one_result_is_counted_in_the_singular(explorer: Explorer, floor_corpus: dict) -> None:
    """Issue 17 item 18: "1 similar study", not "1 similar studies"."""
    explorer.corpus = floor_corpus
    explorer.open("r")
    explorer.choose_scope("This patient's earlier studies")
    assert explorer.look_up() == [floor_corpus["ids"]["r_prior"]]
    said = explorer.page.inner_text("#lookalike-status")
    assert said.startswith("1 ") and not re.search(r"\b1 (\w+ )*studies\b", said), said
    explorer.page.click("#lookalike-kos")
    explorer.page.wait_for_selector(".lookalike-report-link")
    filed = explorer.page.inner_text("#lookalike-status")
    assert not re.search(r"\b1 (\w+ )*(studies|priors)\b", filed), filed


def test_every_column_can_be_reached_on_an_800_px_screen(browser, stack: Stack, corpus: dict) -> None:
    """Issue 17 item 18: at 800 px the table is wider than the page; the Patient column and *Open study* of every
    row can still be brought on screen, as a user does it (a sideways scroll over the table), and clicked."""
    context = browser.new_context(http_credentials={"username": "admin", "password": stack.config.admin_password},
                                  viewport={"width": 800, "height": 900})
    try:
        explorer = Explorer(context.new_page(), stack, corpus)
        explorer.open("a")
        rows = explorer.look_up()
        assert len(rows) >= 2
        explorer.page.wait_for_function(
            "() => $('.lookalike-result img').toArray().every(i => i.complete && i.naturalWidth > 0)")
        for selector in (".lookalike-patient", "a.lookalike-open"):
            target = explorer.page.locator(f".lookalike-result[data-study='{rows[-1]}'] {selector}")
            # Down to the row (the page scrolls up and down as ever), then sideways only as a user can.
            target.evaluate("el => window.scrollBy(0, el.getBoundingClientRect().top - window.innerHeight / 2)")
            for _ in range(20):
                if _on_screen(explorer.page, target):
                    break
                box = target.evaluate("el => { const r = el.closest('tr').getBoundingClientRect();"
                                      " return [r.top + r.height / 2, window.innerWidth / 2]; }")
                explorer.page.mouse.move(box[1], box[0])
                explorer.page.mouse.wheel(120, 0)
                explorer.page.wait_for_timeout(50)
            assert _on_screen(explorer.page, target), selector
        explorer.page.locator(f".lookalike-result[data-study='{rows[-1]}'] a.lookalike-open").click()
        explorer.page.wait_for_function("id => location.hash.indexOf(id) >= 0", arg=rows[-1])
    finally:
        context.close()


def _on_screen(page, locator) -> bool:
    """Whether the element is inside the window and not clipped: the point at its centre shows it."""
    return page.evaluate("""el => {
        const r = el.getBoundingClientRect(), x = r.left + r.width / 2, y = r.top + r.height / 2;
        if (r.width == 0 || r.left < 0 || r.right > window.innerWidth) return false;
        const hit = document.elementFromPoint(x, y);
        return hit === el || el.contains(hit);
    }""", locator.element_handle())
