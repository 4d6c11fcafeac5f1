"""The demo's Label tab: a person labels what Serve's label queue ranks first, one click per prediction.

A click is feedback like any other (POST /v1/feedback): it counts towards the next retrain and the
prediction leaves the queue. The queue is asked again after every click, so two people labelling at once
see what is still unlabelled; Skip passes a prediction over for the rest of the session.
"""

from __future__ import annotations

import io
from datetime import datetime
from typing import Callable

import gradio as gr
from PIL import Image, UnidentifiedImageError

from ui.client import Refused, ServeClient, ServeDown

MAX_LIMIT = 100  # the most the queue lists at once: skips beyond that are forgotten, oldest first
EMPTY = ("**Nothing to label.** Every recent prediction with an image has a label (or was skipped). "
         "Predict some images, then press **Refresh**.")
INTRO = ("The predictions most worth a label: those since the latest drift first, then the ones the model was least "
         "sure of. One click on the correct label saves it as feedback (it counts towards the next retrain) and "
         "shows the next; **Skip** passes one over.")
KEPT = (401, 403, 429)  # a refusal about the caller, not the prediction: it stays on screen


def new_desk() -> dict:
    """One person's place in the queue: the prediction shown, its classes, what they skipped and labelled."""
    return {"item": None, "classes": [], "skipped": [], "labelled": 0, "waiting": 0}


def picture(data: bytes) -> Image.Image | None:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def describe(item: dict, desk: dict) -> str:
    """What the model said about the prediction shown, and where the person is."""
    made = datetime.fromisoformat(item["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
    maybe = f", or maybe **{item['runner_up']}**" if item.get("runner_up") else ""
    drifted = " · made during the latest drift" if item.get("drifted") else ""
    return (f"### The model says **{item['label']}** ({item['confidence']:.0%}){maybe}\n"
            f"margin {item['margin']:.2f} · entropy {item['entropy']:.2f} · model v{item['model_version']} · "
            f"predicted {made} UTC{drifted}\n\n"
            f"waiting for a label: {desk['waiting']} · labelled in this session: {desk['labelled']} · "
            f"prediction `{item['prediction_id']}`")


class LabelDesk:
    """The tab's actions over Serve's HTTP API. Each returns the tab's outputs:
    (desk, image, about the prediction, the label choice, status line)."""

    def __init__(self, api: ServeClient, problem: Callable[[str], str]):
        self.api = api
        self.problem = problem  # shows a message and returns it for the status line

    def refresh(self, desk: dict | None = None) -> tuple:
        return self.show(desk or new_desk(), "")

    def label(self, desk: dict | None, label: str | None) -> tuple:
        """Save `label` for the prediction shown, then show the next."""
        desk = desk or new_desk()
        item = desk["item"]
        if item is None:
            return self.show(desk, "")
        if not label:
            return self.kept(desk, self.problem("Pick the correct label."))
        try:
            self.api.feedback(item["prediction_id"], label)
        except ServeDown as exc:
            return self.kept(desk, self.problem(str(exc)))
        except Refused as exc:
            note = self.problem(f"Serve refused the label ({exc.status}): {exc}")
            return self.kept(desk, note) if exc.status in KEPT else self.show(passed_over(desk), note)
        desk = {**desk, "item": None, "labelled": desk["labelled"] + 1}
        return self.show(desk, f"✔ Saved: prediction `{item['prediction_id']}` is a **{label}**. "
                               "It counts towards the next retrain.")

    def skip(self, desk: dict | None) -> tuple:
        """Pass over the prediction shown for the rest of the session."""
        desk = desk or new_desk()
        if desk["item"] is None:
            return self.show(desk, "")
        return self.show(passed_over(desk), f"Skipped prediction `{desk['item']['prediction_id']}`.")

    def show(self, desk: dict, note: str) -> tuple:
        """The queue's first prediction this person did not skip, with its image."""
        skipped = set(desk["skipped"])
        try:
            queue = self.api.label_queue(min(MAX_LIMIT, 1 + len(skipped)))
        except ServeDown as exc:
            return self.view({**desk, "item": None}, None, "", self.problem(str(exc)))
        except Refused as exc:
            hint = " Set RAYLOOP_API_KEYS for the demo." if exc.status in (401, 403) else ""
            return self.view({**desk, "item": None}, None, "",
                             self.problem(f"Serve refused the label queue ({exc.status}): {exc}.{hint}"))
        item = next((i for i in queue["items"] if i["prediction_id"] not in skipped), None)
        desk = {**desk, "item": item, "classes": queue["classes"] or desk["classes"],
                "waiting": max(0, queue["candidates"] - len(skipped))}
        if item is None:
            return self.view(desk, None, EMPTY, note)
        try:
            image, missing = picture(self.api.image(item["prediction_id"])), ""
        except (ServeDown, Refused) as exc:
            image, missing = None, f"\n\n(The image cannot be shown: {exc}. Skip this one.)"
        return self.view(desk, image, describe(item, desk) + missing, note)

    def kept(self, desk: dict, note: str) -> tuple:
        """The same prediction stays on screen, with a note."""
        return desk, gr.update(), gr.update(), gr.update(value=None), note

    @staticmethod
    def view(desk: dict, image: Image.Image | None, about: str, note: str) -> tuple:
        choice = gr.update(choices=desk["classes"], value=None, interactive=desk["item"] is not None)
        return desk, image, about, choice, note


def passed_over(desk: dict) -> dict:
    skipped = [*desk["skipped"], desk["item"]["prediction_id"]][-(MAX_LIMIT - 1):]
    return {**desk, "item": None, "skipped": skipped}


def build_tab(api: ServeClient, problem: Callable[[str], str]) -> None:
    """The Label tab, inside the demo's gr.Tabs (its own session state; functions /label_queue, /label, /skip)."""
    desk = LabelDesk(api, problem)
    with gr.Tab("Label", id="label") as tab:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="pil", interactive=False, height=320, elem_id="label-image")
            with gr.Column():
                about = gr.Markdown(elem_id="label-about")
                choice = gr.Radio(label="The correct label (one click saves it)", choices=[], elem_id="label-choice")
                with gr.Row():
                    skip = gr.Button("Skip")
                    refresh = gr.Button("Refresh")
                status = gr.Markdown(elem_id="label-status")
        state = gr.State(new_desk())
    outputs = [state, image, about, choice, status]
    tab.select(desk.refresh, state, outputs, api_visibility="private")
    refresh.click(desk.refresh, state, outputs, api_name="label_queue")
    choice.input(desk.label, [state, choice], outputs, api_name="label")  # a person's click, not our reset
    skip.click(desk.skip, state, outputs, api_name="skip")
