"""The Predict tab's view for a segmentation model (the demo shows it when GET /v1/model says so): the predicted
crack mask over the image, and a brush to correct it that sends the corrected mask as feedback (POST /v1/feedback).

The editor shows the image with the predicted mask as a red, half-transparent layer above it: the brush paints
missing crack, the eraser removes false crack. Whatever is left opaque in that layer is the corrected mask,
scaled back (nearest neighbour) to the image's own width x height, the size Serve checks it against.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Callable

import gradio as gr
import numpy as np
from PIL import Image

from ui.client import Refused, ServeClient, ServeDown
from ui.label import picture

TINT = (255, 0, 0)
TINT_SHARE = 0.45  # how much red the overlay mixes into a crack pixel
LAYER_ALPHA = 140  # the editor's mask layer: red, half-transparent, so the crack under it stays visible
PAINTED = 64  # a layer pixel at least this opaque is crack (the brush's soft edge and scaling stay below it)
CANVAS = (768, 768)  # the editor's canvas: every image is scaled (nearest) to fit it, so small ones can be painted
MARGIN = (64, 64, 64, 255)  # the canvas around an image of another shape
INTRO = "Upload an image, then press **Predict** to see where the model finds crack."
HOW_TO = ("Correct the mask below: the **brush** paints missing crack, the **eraser** removes false crack. "
          "Then press **Send correction**.")


def mask_pixels(mask_png: bytes) -> np.ndarray:
    """A mask PNG from Serve (0 background, anything else crack) -> bool HxW."""
    with Image.open(io.BytesIO(mask_png)) as image:
        return np.asarray(image.convert("L")) > 0


def mask_png(mask: np.ndarray) -> bytes:
    """bool HxW -> the PNG Serve takes as a corrected mask: 0 background, 255 crack."""
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").save(buffer, "PNG")
    return buffer.getvalue()


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image in RGB with the mask's pixels, and only those, tinted red."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    tinted = rgb * (1 - TINT_SHARE) + np.array(TINT, np.float32) * TINT_SHARE
    return Image.fromarray(np.where(mask[..., None], np.rint(tinted), rgb).astype(np.uint8), "RGB")


def placement(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where an image of size (width, height) lies on the editor's canvas, scaled to fit and centred:
    (left, top, right, bottom)."""
    width, height = size
    scale = min(CANVAS[0] / width, CANVAS[1] / height)
    fitted = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (CANVAS[0] - fitted[0]) // 2, (CANVAS[1] - fitted[1]) // 2
    return left, top, left + fitted[0], top + fitted[1]


def on_canvas(image: Image.Image, fill: tuple[int, int, int, int]) -> Image.Image:
    """An RGBA image scaled (nearest) into its place on a canvas of `fill`."""
    box = placement(image.size)
    canvas = Image.new("RGBA", CANVAS, fill)
    canvas.paste(image.convert("RGBA").resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.NEAREST),
                 box[:2])
    return canvas


def enlarged(image: Image.Image) -> Image.Image:
    """A small image scaled up (nearest) to fill the canvas's size, so its pixels show; a large one as it is."""
    left, top, right, bottom = placement(image.size)
    fitted = right - left, bottom - top
    return image if fitted[0] <= image.width else image.resize(fitted, Image.Resampling.NEAREST)


def mask_layer(mask: np.ndarray) -> Image.Image:
    """bool HxW -> the editor's layer on the canvas: red and half-transparent on crack, clear elsewhere."""
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = (*TINT, LAYER_ALPHA)
    return on_canvas(Image.fromarray(rgba, "RGBA"), (0, 0, 0, 0))


def editor_value(image: Image.Image, mask: np.ndarray) -> dict:
    """What the editor opens with: the image as its background and the mask as the layer to paint on.
    Both fill the editor's whole canvas (Gradio centres a layer smaller than the canvas, which would shift
    it off the image), and no composite: Gradio would show it as the background."""
    return {"background": on_canvas(image, MARGIN), "layers": [mask_layer(mask)], "composite": None}


def painted_mask(edited: dict, size: tuple[int, int]) -> np.ndarray:
    """The editor's value -> bool HxW at size (width, height): crack wherever a layer is opaque enough.

    A layer is the editor's canvas at whatever scale the browser sent it: scaled back to the canvas, the
    image's place cut out and scaled to the image's size, all with nearest neighbours. Nothing painted
    means "no crack"."""
    width, height = size
    box = placement(size)
    mask = np.zeros((height, width), bool)
    for layer in edited.get("layers") or []:
        layer = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))
        alpha = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a >= PAINTED else 0)
        alpha = alpha.resize(CANVAS, Image.Resampling.NEAREST).crop(box)
        mask |= np.asarray(alpha.resize(size, Image.Resampling.NEAREST)) > 0
    return mask


def about(answer: dict) -> str:
    return (f"## Prediction: {answer['label']}\n"
            f"crack area: {answer['area_pixels']} px ({answer['area_percent']:.2f} %) · "
            f"confidence **{answer['confidence']:.1%}** · model version **{answer['model_version']}**")


class Segmenter:
    """The view's actions over Serve's HTTP API: predict an upload, send the corrected mask."""

    def __init__(self, api: ServeClient, problem: Callable[[str], str]):
        self.api = api
        self.problem = problem  # shows a message and returns it for the status line

    def predict(self, upload: str | None) -> tuple:
        """(overlay, about the prediction, prediction id, editor value, the answer kept for the correction,
        status line)."""
        if not upload:
            return self.failed("Upload an image first (PNG or JPEG).")
        data = Path(upload).read_bytes()
        try:
            answer = self.api.predict(data, Path(upload).name)
        except ServeDown as exc:
            return self.failed(str(exc))
        except Refused as exc:
            return self.failed(f"Serve refused this image ({exc.status}): {exc}")
        image = picture(data)
        if "mask_png_b64" not in answer or image is None:
            return self.failed("Serve answered without a mask: the served model is not a segmentation model "
                               "(reload the page: the Predict tab follows the served model).")
        mask = mask_pixels(base64.b64decode(answer["mask_png_b64"]))
        kept = {k: v for k, v in answer.items() if k != "mask_png_b64"}
        return (enlarged(overlay(image, mask)), about(answer), answer["prediction_id"], editor_value(image, mask), kept,
                f"Stored. {HOW_TO}")

    def failed(self, message: str) -> tuple:
        return None, "", "", None, None, self.problem(message)

    def correct(self, edited: dict | None, answer: dict | None) -> str:
        """Send the editor's mask, at the image's size, as the prediction's feedback."""
        if not answer:
            return self.problem("Predict an image first: a correction belongs to a prediction.")
        if not edited or edited.get("background") is None:
            return self.problem("The editor holds no image: press **Predict** again to correct its mask.")
        mask = painted_mask(edited, (answer["width"], answer["height"]))
        try:
            created = self.api.mask_feedback(answer["prediction_id"], mask_png(mask))
        except ServeDown as exc:
            return self.problem(str(exc))
        except Refused as exc:
            return self.problem(f"Serve refused the correction ({exc.status}): {exc}")
        area = int(mask.sum())
        gr.Info(f"Correction saved: {area} px of crack.")
        return (f"✔ saved: feedback `{created['feedback_id']}`: prediction `{answer['prediction_id']}` has "
                f"{area} px ({100 * area / mask.size:.2f} %) of crack. It counts towards the next retrain.")


def build_view(api: ServeClient, problem: Callable[[str], str], untouched: Callable[[gr.Image], gr.Image]
               ) -> gr.Column:
    """The segmentation view, hidden until Serve says it runs a segmentation model (functions /segment and
    /correct_mask); `untouched` makes the upload reach Serve as uploaded."""
    segmenter = Segmenter(api, problem)
    with gr.Column(visible=False, elem_id="segment") as view:
        with gr.Row():
            with gr.Column():
                upload = untouched(gr.Image(label="Image (PNG or JPEG)", type="filepath", height=320,
                                            sources=["upload", "clipboard"], elem_id="segment-upload"))
                predict = gr.Button("Predict", variant="primary", elem_id="segment-predict")
            with gr.Column():
                shown = gr.Image(label="Predicted crack (red)", type="pil", interactive=False, height=320,
                                 elem_id="segment-overlay")
                answer = gr.Markdown(INTRO, elem_id="segment-answer")
                prediction_id = gr.Textbox(label="Prediction id", interactive=False, elem_id="segment-prediction-id")
        # No upload, crop or extra layers: the canvas must stay the image with its one mask layer.
        editor = gr.ImageEditor(label="Correct the mask", type="pil", image_mode="RGBA", format="png", height=560,
                                canvas_size=CANVAS, sources=[], transforms=[],
                                layers=gr.LayerOptions(allow_additional_layers=False),
                                brush=gr.Brush(colors=[(f"rgb{TINT}", LAYER_ALPHA / 255)], color_mode="fixed"),
                                eraser=gr.Eraser(), elem_id="segment-editor")
        send = gr.Button("Send correction", elem_id="segment-send")
        status = gr.Markdown(elem_id="segment-status")
        kept = gr.State(None)
    predict.click(segmenter.predict, upload, [shown, answer, prediction_id, editor, kept, status], api_name="segment")
    send.click(segmenter.correct, [editor, kept], status, api_name="correct_mask")
    return view
