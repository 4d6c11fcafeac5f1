"""The demo's segmentation view: the predicted crack over the image, and a painted correction sent as a mask.

The pure conversions (mask <-> editor, the overlay) are checked on their own; the view's buttons run against
the real HTTP app in this process (a U-Net whose answer is "dark pixels are crack", tests/support/seg_backend.py)
served by uvicorn on a free port, and what Serve stored is read back from its store; last, a person does the same
with the mouse in headless Chromium, on the real demo pointed at that server. No Ray.
"""

from __future__ import annotations

import io
import re
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import numpy as np
import pytest
import uvicorn
from PIL import Image, ImageDraw

from cluster.ray_cluster import free_port
from serve.http import create_app
from store import Store
from tests.support.browser import chromium_page
from tests.support.fake_backend import BrightnessBackend
from tests.support.http_contract import settings_for
from tests.support.seg_backend import SegmentationBackend
from train.masks import encode_mask_png, mask_from_json, read_mask
from ui import segment
from ui.app import build_demo, launch
from ui.client import ServeClient

WIDTH, HEIGHT = 120, 80  # on the 768 x 768 canvas: scaled by 6.4 to 768 x 512, from row 128 down
RED, CLEAR = (255, 0, 0, segment.LAYER_ALPHA), (0, 0, 0, 0)


def crack_photo() -> Image.Image:
    """A light gray photo with a dark vertical band at columns 40-59: the crack."""
    pixels = np.full((HEIGHT, WIDTH), 200, np.uint8)
    pixels[:, 40:60] = 20
    return Image.fromarray(pixels, "L")


def band() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[:, 40:60] = True
    return mask


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def canvas_rows(top: int, bottom: int) -> tuple[int, int]:
    """Image rows [top, bottom) as the canvas's rows (inclusive), for ImageDraw."""
    return 128 + round(top * 6.4), 128 + round(bottom * 6.4) - 1


def correct_like_a_person(edited: dict) -> dict:
    """Paint crack across rows 10-14 and erase columns 40-49 of rows 0-19, on the editor's layer."""
    layer = edited["layers"][0].copy()
    draw = ImageDraw.Draw(layer)
    top, bottom = canvas_rows(10, 15)
    draw.rectangle([(0, top), (segment.CANVAS[0] - 1, bottom)], fill=RED)
    top, bottom = canvas_rows(0, 20)
    draw.rectangle([(256, top), (319, bottom)], fill=CLEAR)  # columns 40-49 at 6.4 canvas pixels each
    return {**edited, "layers": [layer]}


def corrected(mask: np.ndarray) -> np.ndarray:
    """What correct_like_a_person makes of `mask`, in the image's own pixels."""
    mask = mask.copy()
    mask[10:15] = True
    mask[0:20, 40:50] = False
    return mask


@contextmanager
def serving(settings, backend):
    """The real HTTP app over `backend` and a store of its own, served by uvicorn at settings' serve_url."""
    store = Store.from_settings(settings)
    config = uvicorn.Config(create_app(backend, store, settings), host="127.0.0.1",
                            port=urlsplit(settings.services.serve_url).port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the app did not start"
    try:
        yield store
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()


def serve_settings(tmp_path):
    return settings_for(tmp_path, RAYLOOP_SERVE_URL=f"http://127.0.0.1:{free_port()}")


@pytest.fixture(scope="module")
def segmenting(tmp_path_factory):
    """A segmentation Serve in this process: (its URL, its store)."""
    settings = serve_settings(tmp_path_factory.mktemp("segment"))
    with serving(settings, SegmentationBackend(settings.serve)) as store:
        yield settings.services.serve_url, store


def segmenter(url: str) -> segment.Segmenter:
    return segment.Segmenter(ServeClient(url), problem=lambda message: f"⚠ {message}")


# -- the conversions -------------------------------------------------------------------------------------
def test_the_overlay_tints_exactly_the_mask_pixels():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(20, 200, (HEIGHT, WIDTH, 3), dtype=np.uint8), "RGB")
    mask = rng.random((HEIGHT, WIDTH)) < 0.3

    tinted = np.asarray(segment.overlay(photo, mask)).astype(int)
    before = np.asarray(photo).astype(int)

    assert tinted.shape == before.shape
    assert ((tinted != before).any(axis=-1) == mask).all()
    assert (tinted[mask][:, 0] > before[mask][:, 0]).all() and (tinted[mask][:, 1] < before[mask][:, 1]).all()
    assert segment.overlay(crack_photo(), band()).mode == "RGB"  # a gray photo is tinted too


def test_a_mask_from_serve_opens_in_the_editor_as_a_red_layer_over_the_image():
    served = segment.mask_pixels(encode_mask_png(band().astype(np.uint8)))  # as Serve writes it: 0/255
    assert (served == band()).all()

    edited = segment.editor_value(crack_photo(), served)

    background, [layer] = edited["background"], edited["layers"]
    assert background.size == layer.size == segment.CANVAS and edited["composite"] is None
    assert segment.placement((WIDTH, HEIGHT)) == (0, 128, 768, 640)
    assert background.getpixel((0, 0)) == segment.MARGIN and background.getpixel((10, 300)) == (200, 200, 200, 255)
    alpha = np.asarray(layer)[..., 3]
    assert set(np.unique(alpha)) == {0, segment.LAYER_ALPHA} and not alpha[:128].any() and not alpha[640:].any()
    assert layer.getpixel((300, 300)) == RED and layer.getpixel((100, 300))[3] == 0
    assert (segment.painted_mask(edited, (WIDTH, HEIGHT)) == band()).all()  # an untouched edit is the prediction


@pytest.mark.parametrize("sent_at", [segment.CANVAS, (384, 384), (1000, 1000)],
                         ids=["as drawn", "downscaled", "upscaled"])
def test_painted_and_erased_strokes_come_back_at_the_image_size(sent_at):
    edited = correct_like_a_person(segment.editor_value(crack_photo(), band()))
    edited["layers"] = [edited["layers"][0].resize(sent_at, Image.Resampling.BILINEAR)]  # as a browser may send it

    assert (segment.painted_mask(edited, (WIDTH, HEIGHT)) == corrected(band())).all()


def test_an_edit_with_nothing_painted_means_no_crack():
    edited = segment.editor_value(crack_photo(), np.zeros((HEIGHT, WIDTH), bool))
    erased = {**edited, "layers": [Image.new("RGBA", segment.CANVAS, CLEAR)]}

    for value in (edited, erased, {**edited, "layers": []}):
        assert not segment.painted_mask(value, (WIDTH, HEIGHT)).any()
    sent = segment.mask_png(segment.painted_mask(erased, (WIDTH, HEIGHT)))
    assert Image.open(io.BytesIO(sent)).size == (WIDTH, HEIGHT) and not read_mask(sent).any()
    assert set(np.unique(np.asarray(Image.open(io.BytesIO(segment.mask_png(band())))))) == {0, 255}


# -- the view against Serve ------------------------------------------------------------------------------
def test_a_person_predicts_paints_a_correction_and_serve_stores_it_at_the_image_size(segmenting, tmp_path):
    url, store = segmenting
    upload = tmp_path / "crack.png"
    upload.write_bytes(png(crack_photo()))
    view = segmenter(url)

    shown, about, prediction_id, edited, kept, status = view.predict(str(upload))

    area = re.search(r"crack area: (\d+) px \((\d+\.\d\d) %\)", about)
    assert (int(area.group(1)), float(area.group(2))) == (kept["area_pixels"], round(kept["area_percent"], 2))
    assert "Prediction: crack" in about and "model version **1**" in about and "confidence" in about
    assert prediction_id == kept["prediction_id"] and "mask_png_b64" not in kept and "brush" in status
    assert shown.size == (768, 512)  # the 120 x 80 overlay, enlarged with its pixels kept
    predicted = segment.painted_mask(edited, (WIDTH, HEIGHT))
    assert predicted.sum() == kept["area_pixels"] and (predicted == band()).mean() > 0.95

    saved = view.correct(correct_like_a_person(edited), kept)

    feedback_id = re.search(r"saved: feedback `([0-9a-f-]{36})`", saved).group(1)
    stored = mask_from_json(store.feedback_mask(feedback_id))
    assert stored.shape == (HEIGHT, WIDTH) and (stored == corrected(predicted)).all()


def test_the_view_says_what_went_wrong(segmenting, tmp_path):
    url, _ = segmenting
    upload = tmp_path / "crack.png"
    upload.write_bytes(png(crack_photo()))
    view = segmenter(url)
    *_, edited, kept, _ = view.predict(str(upload))

    wrong_size = view.correct(edited, {**kept, "width": WIDTH - 20})
    *_, nothing = view.predict(None)
    early = view.correct(None, None)
    *_, down = segmenter(f"http://127.0.0.1:{free_port()}").predict(str(upload))

    assert "Serve refused the correction (422)" in wrong_size and "120x80" in wrong_size
    assert "Upload an image first" in nothing and "Predict an image first" in early
    assert "Serve is not reachable" in down


def shown_view(settings) -> tuple[str, dict, dict]:
    """What the demo's page load says: the header, and the updates of the classification and segmentation views."""
    demo = build_demo(settings)
    try:
        [load] = [f for f in demo.fns.values() if f.api_name == "model"]
        header, _, classify, segmentation = load.fn()
        [view] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "segment"]
        assert view.visible is False  # hidden until Serve says it segments
        return header, classify, segmentation
    finally:
        demo.close()


@pytest.mark.parametrize("backend, segments", [(SegmentationBackend, True), (BrightnessBackend, False)],
                         ids=["segmentation", "classification"])
def test_the_predict_tab_shows_the_view_for_the_served_models_task(tmp_path, backend, segments):
    settings = serve_settings(tmp_path)
    with serving(settings, backend(settings.serve)):
        header, classify, segmentation = shown_view(settings)

    assert "Serving" in header
    assert (classify["visible"], segmentation["visible"]) == (not segments, segments)


def test_with_serve_down_the_demo_keeps_its_classification_view(tmp_path):
    header, classify, segmentation = shown_view(serve_settings(tmp_path))

    assert "Serve is not reachable" in header
    assert "visible" not in classify and "visible" not in segmentation  # the page stays as it was built


def test_retrain_now_says_why_it_could_not_start(segmenting, tmp_path):
    from ui import timeline

    url, _ = segmenting
    note = timeline.retrain_now(ServeClient(url))  # no Ray here: Serve cannot submit the job and says so
    assert note.startswith("⚠") and "cannot submit the retrain job" in note
    assert "not reachable" in timeline.retrain_now(ServeClient(f"http://127.0.0.1:{free_port()}"))


# -- a person in Chromium --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segment_demo_url(segmenting, tmp_path_factory):
    """The real demo, on a free port in a background thread, calling the in-process segmentation Serve."""
    url, _ = segmenting
    demo = build_demo(settings_for(tmp_path_factory.mktemp("demo"), RAYLOOP_SERVE_URL=url))
    yield launch(demo, "127.0.0.1", free_port(), block=False)
    demo.close()


def paint_across(page, row: int, left: int, right: int) -> None:
    """Pick the brush and drag the mouse along image row `row` from column `left` to `right`, as a person would."""
    editor = page.locator("#segment-editor")
    editor.get_by_role("button", name="Brush", exact=True).click()
    zoom = int(editor.get_by_text(re.compile(r"^\d+%$")).inner_text()[:-1]) / 100  # the editor fits its canvas
    canvas = editor.locator("canvas").first
    canvas.scroll_into_view_if_needed()  # the mouse reaches only what is on screen
    box = canvas.bounding_box()  # the editor centres its canvas in there
    centre_x, centre_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    left_px, top_px, right_px, _ = segment.placement((WIDTH, HEIGHT))
    per_pixel = (right_px - left_px) / WIDTH

    def at(column: int) -> tuple[float, float]:
        canvas_x, canvas_y = left_px + (column + 0.5) * per_pixel, top_px + (row + 0.5) * per_pixel
        return (centre_x + zoom * (canvas_x - segment.CANVAS[0] / 2),
                centre_y + zoom * (canvas_y - segment.CANVAS[1] / 2))

    page.mouse.move(*at(left))
    page.mouse.down()
    page.mouse.move(*at(right), steps=5)  # each move redraws the canvas, in software here: a few will do
    page.mouse.up()


@pytest.mark.slow  # 30-40 s on 2 cores: Chromium draws the editor's WebGL canvas in software
def test_a_person_paints_missing_crack_in_chromium_and_serve_stores_it(segmenting, segment_demo_url, tmp_path):
    from playwright.sync_api import expect

    url, store = segmenting
    upload = tmp_path / "crack.png"
    upload.write_bytes(png(crack_photo()))
    with chromium_page() as page:
        page.goto(segment_demo_url)
        expect(page.locator("#header")).to_contain_text("segments crack", timeout=30_000)
        view = page.locator("#segment")
        expect(view).to_be_visible()
        expect(page.locator("#upload")).to_be_hidden()  # the classification view's upload

        view.locator("#segment-upload input[type=file]").set_input_files(upload)
        expect(view.locator("#segment-upload img")).to_be_visible(timeout=15_000)
        view.get_by_role("button", name="Predict", exact=True).click()
        answer = view.locator("#segment-answer")
        expect(answer).to_contain_text(re.compile(r"crack area: \d+ px"), timeout=30_000)
        expect(view.locator("#segment-overlay img")).to_be_visible()
        area = int(re.search(r"crack area: (\d+) px", answer.inner_text()).group(1))

        paint_across(page, row=40, left=75, right=105)  # through the gray right of the crack
        view.get_by_role("button", name="Send correction").click()
        expect(view.locator("#segment-status")).to_contain_text("saved: feedback", timeout=30_000)
        saved = view.locator("#segment-status").inner_text()

    stored = mask_from_json(store.feedback_mask(re.search(r"feedback ([0-9a-f-]{36})", saved).group(1))) > 0
    *_, edited, _, _ = segmenter(url).predict(str(upload))  # what the page showed: the model is deterministic
    predicted = segment.painted_mask(edited, (WIDTH, HEIGHT))
    assert predicted.sum() == area and (predicted == band()).mean() > 0.95  # the band, as the model sees it
    assert stored.shape == (HEIGHT, WIDTH) and stored[predicted].all() and stored.sum() > area
    rows, columns = np.nonzero(stored & ~predicted)  # the stroke, and only the stroke
    assert stored[40, 80:100].all() and 30 <= rows.min() <= rows.max() <= 50
    assert 65 <= columns.min() <= columns.max() <= 115
