"""The Gradio demo: predict an uploaded or sketched image, send feedback, label the queue, browse history and
monitoring.

Run with `python -m ui.app` (`make up` starts it); it talks to Serve only over the HTTP API.
"""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import gradio as gr
import pandas as pd
from PIL import Image, ImageOps

from cluster import environment
from cluster.settings import Settings, load_settings
from ui import explain, label, segment
from ui import timeline as loop_picture
from ui.client import Refused, ServeClient, ServeDown

TOP_K = 5
HISTORY_ROWS = 50
TIMELINE_ROWS = 30
# The audit events that tell the retrain -> gate -> promotion -> rollout story (not feedback, not drift checks).
# The demo speaks HTTP only (it imports no store code): these are the wire names of store.Event.
TIMELINE_EVENTS = ("retrain_triggered", "retrain_started", "trials_finished", "gate_decision", "promoted",
                   "retrain_finished", "retrain_failed", "rollout_started", "rollout_finished", "rollout_skipped",
                   "rollback", "rollout_stage", "rollout_rolled_back")
HISTORY_COLUMNS = ["time (UTC)", "prediction id", "label", "confidence", "model version", "feedback"]
TIMELINE_COLUMNS = ["time (UTC)", "event", "actor", "what happened"]
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
# Gradio's sketchpad waits for a tool to be picked: pick the brush once it is there (under load the tab's
# content mounts late, and a click before the canvas is ready is ignored, so retry while it still waits).
PICK_BRUSH = """() => {
  let tries = 0, clicked = false;
  const pick = () => {
    const brush = document.querySelector('#sketch button[aria-label=Brush]');
    const waiting = [...document.querySelectorAll('#sketch div')].some(
      d => d.textContent.trim() === 'select the draw tool to start' && d.offsetParent !== null);
    if (brush && (waiting || !clicked)) { brush.click(); clicked = true; }
    if ((!brush || waiting) && ++tries < 60) setTimeout(pick, 250);
  };
  setTimeout(pick, 100);
}"""
# A 28x28 digit shown at the preview's full size, with crisp pixels.
CSS = "#upload img, #label-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def hand_over_untouched(image: gr.Image) -> gr.Image:
    """Make an upload component pass the file as uploaded: Serve, not the demo, judges what a valid image is."""
    # Patched on the instance: a gr.Image subclass would make Gradio write a .pyi file beside this module.
    decode = image.preprocess
    image.preprocess = lambda payload: payload.path if payload is not None and payload.path else decode(payload)
    return image


def serve_url(settings: Settings) -> str:
    """Where the demo calls Serve: services.serve_url, else Serve's own host and port."""
    s = settings.services
    host = "127.0.0.1" if s.host in WILDCARD_HOSTS else s.host
    return s.serve_url.rstrip("/") or f"http://{host}:{s.serve_port}"


def api_key(settings: Settings) -> str | None:
    """The first configured plain API key (digest-only entries cannot be sent), else None."""
    return settings.serve.client_key()


def browser_host(settings: Settings, request: gr.Request | None) -> str:
    """The host a browser reaches our services at: ours, or the one it used for the demo when we listen on all."""
    host = settings.services.host
    if host in WILDCARD_HOSTS:
        asked = request.headers.get("host", "") if request is not None else ""
        host = urlsplit(f"//{asked}").hostname or "localhost"
    return host


def public_serve_url(settings: Settings, request: gr.Request | None) -> str:
    """Serve's base URL as a browser sees it (an in-container serve_url like http://ray-head:8000 is not)."""
    if settings.services.serve_url and settings.services.host not in WILDCARD_HOSTS:
        return settings.services.serve_url.rstrip("/")
    return f"http://{browser_host(settings, request)}:{settings.services.serve_port}"


def sketch_png(sketch: dict | None) -> bytes | None:
    """A sketch as an MNIST-like PNG (light strokes on black, centred with a margin); None when blank."""
    composite = (sketch or {}).get("composite")
    if composite is None:
        return None
    flat = Image.new("RGBA", composite.size, "white")
    flat.alpha_composite(composite.convert("RGBA"))
    digit = ImageOps.invert(flat.convert("L"))
    box = digit.point(lambda v: 255 if v > 30 else 0).getbbox()
    if box is None:
        return None
    digit = digit.crop(box)
    # MNIST digits fill about 20 of 28 pixels: pad to a square 1.4 times the stroke's extent.
    side = int(max(digit.size) * 1.4) + 1
    square = Image.new("L", (side, side), 0)
    square.paste(digit, ((side - digit.width) // 2, (side - digit.height) // 2))
    buffer = io.BytesIO()
    square.resize((28, 28), Image.Resampling.LANCZOS).save(buffer, "PNG")
    return buffer.getvalue()


def chosen_image(upload: str | None, sketch: dict | None, source: str) -> tuple[bytes, str]:
    """The image on screen (the upload, or the sketch as a PNG) and its file name; ValueError says what is missing."""
    if source == "sketch":
        data = sketch_png(sketch)
        if data is None:
            raise ValueError("The sketchpad is empty: draw a digit first.")
        return data, "sketch.png"
    if not upload:
        raise ValueError("Upload an image first (PNG or JPEG), or switch to the Sketch tab.")
    return Path(upload).read_bytes(), Path(upload).name


def top_k_frame(probabilities: dict[str, float], k: int = TOP_K) -> pd.DataFrame:
    best = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)[:k]
    return pd.DataFrame({"label": [label for label, _ in best], "probability": [p for _, p in best]})


def utc(stamp: str | None) -> str:
    return datetime.fromisoformat(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else ""


def describe_event(event: str, d: dict) -> str:
    """One line per audit event, in words."""
    if event == "gate_decision":
        outcome = d.get("outcome") or ("promote" if d.get("passed") else "reject")
        verdict = {"promote": "passed the gate", "not_enough_evidence": "waits for more evidence at the gate"
                   }.get(outcome, "failed the gate")
        return (f"challenger v{d.get('challenger_version')} {verdict} against champion "
                f"v{d.get('champion_version')}: {d.get('reason', '')}")
    if event == "promoted":
        return f"v{d.get('version')} is the champion (was v{d.get('previous')})"
    if event == "rollback":
        return f"rolled back from v{d.get('from')} to v{d.get('to')}"
    if event == "rollout_stage":
        share = f" answering {d.get('canary_share', 0):.0%} of requests" if d.get("stage") == "canary" else ""
        return f"v{d.get('version')} in {d.get('stage')}{share} beside champion v{d.get('champion')}"
    if event == "rollout_rolled_back":
        return f"v{d.get('version')} rolled back in its {d.get('stage', 'rollout')}: {d.get('reason', '')}"[:300]
    if event.startswith("rollout_"):
        extra = f" in {d['seconds']} s" if "seconds" in d else f": {d['reason']}" if "reason" in d else ""
        return f"Serve rolling update to v{d.get('version')}{extra}"
    if event == "retrain_failed":
        return f"retrain ({d.get('trigger', '?')}) failed: {d.get('error', '')}"[:300]
    text = ", ".join(f"{k}={v}" for k, v in d.items() if v is not None and not isinstance(v, (dict, list)))
    return text[:300] or json.dumps(d, default=str)[:300]


def build_demo(settings: Settings) -> gr.Blocks:
    """The demo's page: Predict (upload or sketch, explain, feedback), Label, History and Monitoring tabs."""
    api = ServeClient(serve_url(settings), api_key(settings))
    s = settings.services

    def problem(message: str) -> str:
        gr.Warning(message.replace("`", ""))  # the pop-up shows plain text, the status line Markdown
        return f"⚠ {message}"

    def model_header() -> tuple[str, dict, dict, dict]:
        """The served model, and the Predict tab's view for its task (classification also when Serve is down)."""
        try:
            m = api.model()
        except (ServeDown, Refused) as exc:
            return problem(str(exc)), gr.update(), gr.update(), gr.update()
        version = m.get("served_version") or m.get("version") or "?"
        classes = m.get("classes") or []
        segmenting = m.get("task") == "segmentation"
        kind = f"segments {', '.join(classes[1:])}" if segmenting else f"{len(classes)} classes"
        return (f"Serving **{m['name']} v{version}** ({kind}) from `{api.url}`.",
                gr.update(choices=classes), gr.update(visible=not segmenting), gr.update(visible=segmenting))

    def predict(upload: str | None, sketch: dict | None, source: str):
        nothing = ("", None, "", gr.update(), None)
        try:
            data, name = chosen_image(upload, sketch, source)
        except ValueError as exc:
            return *nothing, problem(str(exc))
        try:
            answer = api.predict(data, name)
        except ServeDown as exc:
            return *nothing, problem(str(exc))
        except Refused as exc:
            return *nothing, problem(f"Serve refused this image ({exc.status}): {exc}")
        summary = (f"## Prediction: {answer['label']}\n"
                   f"confidence **{answer['confidence']:.1%}** · model version **{answer['model_version']}**")
        classes = list(answer["probabilities"])
        return (summary, top_k_frame(answer["probabilities"]), answer["prediction_id"],
                gr.update(choices=classes, value=answer["label"], interactive=True), answer,
                "Stored. If the label is wrong, pick the right one below and press **Send feedback**.")

    def feedback(prediction_id: str, label: str | None) -> str:
        if not prediction_id:
            return problem("Predict an image first: feedback belongs to a prediction.")
        if not label:
            return problem("Pick the correct label first.")
        try:
            created = api.feedback(prediction_id, label)
        except ServeDown as exc:
            return problem(str(exc))
        except Refused as exc:
            return problem(f"Serve refused the feedback ({exc.status}): {exc}")
        gr.Info(f"Feedback saved: the correct label is {label}.")
        return (f"✔ Feedback saved: prediction `{prediction_id}` is labelled **{label}** "
                f"(feedback id `{created['feedback_id']}`). It counts towards the next retrain.")

    def history() -> tuple[pd.DataFrame, str]:
        empty = pd.DataFrame(columns=HISTORY_COLUMNS)
        try:
            page = api.predictions(HISTORY_ROWS)  # each item carries its feedback
        except (ServeDown, Refused) as exc:
            return empty, problem(str(exc))
        items = page["items"]
        rows = [[utc(p["created_at"]), p["prediction_id"], p["label"], f"{p['confidence']:.1%}",
                 p["model_version"], ", ".join(f["label"] for f in p["feedback"])] for p in items]
        labelled = sum(1 for r in rows if r[-1])
        return (pd.DataFrame(rows, columns=HISTORY_COLUMNS) if rows else empty,
                f"The {len(rows)} latest of {page['total']} predictions, newest first; "
                f"{labelled} of them have feedback.")

    def links(request: gr.Request | None = None) -> str:
        host = browser_host(settings, request)
        serve = public_serve_url(settings, request)
        return (f"- [Ray dashboard](http://{host}:{s.dashboard_port}): cluster, Serve replicas, Ray Jobs "
                "(it asks for Ray's token: `.venv/bin/ray get-auth-token`)\n"
                f"- [MLflow UI](http://{host}:{s.mlflow_port}): runs, metrics, registered model versions\n"
                f"- [Grafana](http://{host}:{s.grafana_port}): dashboards (runs only with `docker compose up`)\n"
                f"- [Serve HTTP API]({serve}/docs): the API this demo uses")

    def drift_summary(request: gr.Request | None, report: bool = False) -> str:
        d = api.drift(report=report)
        if d["status"] == "no check yet":
            m = settings.monitor
            return (f"No drift check yet: the monitor checks every {m.interval_s:g} s once "
                    f"{m.min_window} predictions of the champion are logged.")
        if d["status"] != "checked":
            return f"No drift check could run now: {d['status']}."
        verdict = "**drift detected**" if d.get("drifted") else "**no drift**"
        lines = [f"Latest drift check at {utc(d['checked_at'])} UTC: {verdict} "
                 f"({d.get('share') or 0:.0%} of features drifted, over the last {d.get('window_size')} "
                 f"predictions of model v{d.get('model_version')})."]
        calibrated = d.get("calibrated") or {}
        if calibrated:
            tests = ", ".join(f"{name} p={t['p_value']:.3g}{' (fired)' if t['fired'] else ''}"
                              for name, t in calibrated.get("statistics", {}).items())
            lines.append(f"Decided by calibrated tests, at most {calibrated['false_alarm_rate']:g} false alarms a "
                         f"check: {tests}. Evidently's own rule says "
                         f"{'drift' if d.get('evidently_drifted') else 'no drift'}.")
        estimated = d.get("estimated_accuracy")
        if estimated:
            lines.append(f"Accuracy estimated from the model's confidence (no labels): {estimated['accuracy']:.2f} "
                         f"(90% interval {estimated['low']:.2f}-{estimated['high']:.2f}); it cannot see a shift "
                         "that leaves the model confidently wrong.")
        if d.get("embedding_score") is not None:
            lines.append(f"Embedding MMD²: {d['embedding_score']:.4f}.")
        if d.get("drifted_features"):
            lines.append(f"Drifted features: {', '.join(d['drifted_features'])}.")
        if d.get("report_url"):
            lines.append(f"[Open the Evidently report]({public_serve_url(settings, request)}{d['report_url']})")
        return "\n\n".join(lines)

    def monitoring(request: gr.Request | None = None) -> tuple[str, pd.DataFrame, str]:
        return monitoring_view(request, report=False)

    def monitoring_report(request: gr.Request | None = None) -> tuple[str, pd.DataFrame, str]:
        return monitoring_view(request, report=True)

    def monitoring_view(request: gr.Request | None, report: bool) -> tuple[str, pd.DataFrame, str]:
        empty = pd.DataFrame(columns=TIMELINE_COLUMNS)
        try:
            drift = drift_summary(request, report)
        except (ServeDown, Refused) as exc:
            return problem(str(exc)), empty, links(request)
        try:
            events = [e for name in TIMELINE_EVENTS for e in api.audit(name, TIMELINE_ROWS)]
        except ServeDown as exc:
            return drift, empty, f"{links(request)}\n\n⚠ {exc}"
        except Refused as exc:
            note = f"⚠ The audit trail needs an API key ({exc.status}: {exc}): set RAYLOOP_API_KEYS for the demo."
            return drift, empty, f"{links(request)}\n\n{note}"
        events.sort(key=lambda e: e["at"], reverse=True)
        rows = [[utc(e["at"]), e["event"], e["actor"], describe_event(e["event"], e["details"])]
                for e in events[:TIMELINE_ROWS]]
        return drift, pd.DataFrame(rows, columns=TIMELINE_COLUMNS) if rows else empty, links(request)

    with gr.Blocks(title="rayloop demo", analytics_enabled=False) as demo:
        gr.Markdown("# rayloop\nClassify (or segment) an image with the champion model on Ray Serve, correct "
                    "it with feedback, and watch drift and retraining close the loop.")
        header = gr.Markdown(f"Connecting to Serve at `{api.url}` ...", elem_id="header")
        source = gr.State("upload")
        with gr.Tabs():
            with gr.Tab("Predict", id="predict"):
                with gr.Row() as classify_view:
                    with gr.Column():
                        with gr.Tabs():
                            with gr.Tab("Upload", id="upload") as upload_tab:
                                upload = gr.Image(label="Image (PNG or JPEG)", type="filepath",
                                                  sources=["upload", "clipboard"], height=320, elem_id="upload")
                                hand_over_untouched(upload)
                            with gr.Tab("Sketch", id="sketch") as sketch_tab:
                                sketch = gr.Sketchpad(label="Draw a digit", type="pil", canvas_size=(280, 280),
                                                      brush=gr.Brush(default_size=12, colors=["#000000"],
                                                                     color_mode="fixed"), layers=False,
                                                      elem_id="sketch")
                        predict_button = gr.Button("Predict", variant="primary")
                        explain.build_panel(api, problem, chosen_image, [upload, sketch, source])
                    with gr.Column():
                        answer = gr.Markdown("Upload or sketch an image, then press **Predict**.", elem_id="answer")
                        plot = gr.BarPlot(x="label", y="probability", y_lim=[0, 1], sort="-y", height=220,
                                          label=f"Top-{TOP_K} probabilities", elem_id="top-k")
                        prediction_id = gr.Textbox(label="Prediction id", interactive=False, elem_id="prediction-id")
                        # Custom values pass through so Serve, which knows the model's classes, judges them.
                        correct = gr.Dropdown(label="Correct label", choices=[], interactive=True,
                                              allow_custom_value=True, elem_id="correct-label")
                        feedback_button = gr.Button("Send feedback")
                        status = gr.Markdown(elem_id="status")
                        with gr.Accordion("API answer (JSON)", open=False):
                            raw = gr.JSON()
                segment_view = segment.build_view(api, problem, hand_over_untouched)
            label.build_tab(api, problem)
            with gr.Tab("History", id="history") as history_tab:
                history_note = gr.Markdown(elem_id="history-note")
                history_table = gr.Dataframe(headers=HISTORY_COLUMNS, interactive=False, wrap=True, elem_id="history")
                history_button = gr.Button("Refresh history")
            with gr.Tab("Monitoring", id="monitoring") as monitoring_tab:
                gr.Markdown("### Latest drift check")
                drift_note = gr.Markdown(elem_id="drift")
                rollout_note = gr.Markdown(elem_id="rollout")
                loop_plot = gr.Plot(label="drift share, estimated accuracy and the loop's events", elem_id="loop-plot")
                gr.Markdown("### Retraining and promotion timeline (audit trail)")
                timeline = gr.Dataframe(headers=TIMELINE_COLUMNS, interactive=False, wrap=True, elem_id="timeline")
                gr.Markdown("### Dashboards")
                link_list = gr.Markdown(links(), elem_id="links")
                with gr.Row():
                    monitoring_button = gr.Button("Refresh monitoring")
                    # The monitor saves Evidently's report only for a window that drifted; this asks for one now.
                    report_button = gr.Button("Check now with the Evidently report")
                    retrain_button = gr.Button("Retrain now")
                retrain_note = gr.Markdown(elem_id="retrain-note")

        upload_tab.select(lambda: "upload", outputs=source, api_visibility="private")
        sketch_tab.select(lambda: "sketch", outputs=source, api_visibility="private", js=PICK_BRUSH)
        predict_button.click(predict, [upload, sketch, source], [answer, plot, prediction_id, correct, raw, status],
                             api_name="predict")
        feedback_button.click(feedback, [prediction_id, correct], status, api_name="feedback")
        history_outputs = [history_table, history_note]
        history_button.click(history, outputs=history_outputs, api_name="history")
        history_tab.select(history, outputs=history_outputs, api_visibility="private")
        monitoring_outputs = [drift_note, timeline, link_list]
        monitoring_button.click(monitoring, outputs=monitoring_outputs, api_name="monitoring")
        report_button.click(monitoring_report, outputs=monitoring_outputs, api_name="drift_report")
        monitoring_tab.select(monitoring, outputs=monitoring_outputs, api_visibility="private")
        retrain_button.click(lambda: loop_picture.retrain_now(api), outputs=retrain_note, api_name="retrain")
        picture_outputs = [rollout_note, loop_plot]
        monitoring_button.click(lambda: loop_picture.picture(api), outputs=picture_outputs, api_name="loop_picture")
        monitoring_tab.select(lambda: loop_picture.picture(api), outputs=picture_outputs, api_visibility="private")
        demo.load(model_header, outputs=[header, correct, classify_view, segment_view], api_name="model")
    return demo


def launch(demo: gr.Blocks, host: str, port: int, block: bool = True) -> str:
    """Serve the demo at host:port (blocking unless block=False); its URL."""
    demo.queue(default_concurrency_limit=8)
    quiet_queue(demo)
    demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False, quiet=not block,
        footer_links=["api"], css=CSS)
    return f"http://{host}:{port}/"


def quiet_queue(demo: gr.Blocks, poll_s: float = 0.05) -> None:
    """Gradio's queue polls for work every 1 ms on Linux (every 50 ms on Windows) even when nobody uses the
    demo: 4-5% of a core here for nothing. At 50 ms a click waits at most that long to start."""
    queue = demo._queue  # Gradio 6 exposes no setting for it (pinned in requirements.lock)
    queue.sleep_when_free = max(queue.sleep_when_free, poll_s)
    queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, 2 * poll_s)


def main() -> None:
    """Serve the demo on services.host:services.ui_port until interrupted."""
    environment.apply()  # the demo never imports ray; an entry point sets the environment all the same
    settings = load_settings()
    launch(build_demo(settings), settings.services.host, settings.services.ui_port)


if __name__ == "__main__":
    main()
