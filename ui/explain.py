"""The Predict tab's Explain button: where in the image the served model found its answer (POST /v1/explain).

A button of its own, so a prediction never waits on an explanation. It explains the image on screen (the
upload or the sketch, whichever tab is open) for the class the model predicts, as a heat map over the image.
"""

from __future__ import annotations

import base64
from typing import Callable

import gradio as gr
from PIL import Image

from ui.client import Refused, ServeClient, ServeDown
from ui.label import picture

# (upload path, sketch, "upload" | "sketch") -> (image bytes, file name); ValueError says what is missing
Chosen = Callable[[str | None, dict | None, str], tuple[bytes, str]]
METHODS = {"grad-cam": "Grad-CAM"}
INTRO = "Press **Explain** to see where in the image the model found its answer."


def caption(answer: dict) -> str:
    return (f"Where model v{answer['model_version']} found **{answer['target']}** (it predicts "
            f"**{answer['label']}**, {answer['confidence']:.0%}): red marks the strongest evidence, blue and "
            f"the bare image none. {METHODS.get(answer['method'], answer['method'])} on its layer `{answer['layer']}`.")


class Explainer:
    """The button's action over Serve's HTTP API: (overlay image or None, a line about it)."""

    def __init__(self, api: ServeClient, problem: Callable[[str], str], chosen: Chosen):
        self.api = api
        self.problem = problem  # shows a message and returns it for the status line
        self.chosen = chosen

    def explain(self, upload: str | None, sketch: dict | None, source: str) -> tuple[Image.Image | None, str]:
        try:
            data, name = self.chosen(upload, sketch, source)
        except ValueError as exc:
            return None, self.problem(str(exc))
        try:
            answer = self.api.explain(data, name)
        except ServeDown as exc:
            return None, self.problem(str(exc))
        except Refused as exc:
            return None, self.problem(f"Serve refused to explain this image ({exc.status}): {exc}")
        return picture(base64.b64decode(answer["overlay_png_b64"])), caption(answer)


def build_panel(api: ServeClient, problem: Callable[[str], str], chosen: Chosen, inputs: list) -> None:
    """The Explain button, the overlay and its caption, where it is called in the layout (function /explain)."""
    explainer = Explainer(api, problem, chosen)
    button = gr.Button("Explain")
    overlay = gr.Image(label="Where the model looked (Grad-CAM)", type="pil", interactive=False, height=240,
                       elem_id="explain-overlay")
    note = gr.Markdown(INTRO, elem_id="explain-note")
    button.click(explainer.explain, inputs, [overlay, note], api_name="explain")
