"""Route: why the served model decided what it did on one image (Grad-CAM), as JSON or as the PNG overlay.

Off the prediction path: nothing is logged or stored, and /v1/predict never waits on it. The cost is bounded
by a per-client window of its own (serve.explain_per_minute), the upload limits of /v1/predict, and one
explanation at a time per replica (ModelServer.explain).
"""

from __future__ import annotations

import base64
from typing import Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

from serve import images, schemas
from serve.http.context import Context
from serve.http.deps import ClientLimit
from serve.http.uploads import IMAGE_BODY, read_images, rejected

ANSWERED = ("label", "confidence", "model_version", "target", "method", "layer", "saliency")
RESPONSES = {
    200: {"content": {"image/png": {}}, "description": "the explanation; with format=png the overlay itself, "
          "its label, target and model version in X-Label, X-Target, X-Model-Version (URL-encoded)"},
    409: {"model": schemas.ErrorOut, "description": "the served model segments: its mask is the explanation"},
    422: {"model": schemas.ErrorOut, "description": "`target` is not a class of the served model"},
    429: {"model": schemas.ErrorOut, "description": "over serve.explain_per_minute; Retry-After says when to retry"},
}


def router(ctx: Context) -> APIRouter:
    api = APIRouter(tags=["explain"])
    limits = ctx.settings.serve
    per_client = ClientLimit(limits, limits.explain_per_minute, "explanations")

    @api.post("/v1/explain", response_model=schemas.Explanation, responses=RESPONSES, openapi_extra=IMAGE_BODY,
              dependencies=[Depends(per_client)])
    async def explain(
            request: Request,
            target: str | None = Query(None, description="the class to explain (default: the predicted one)"),
            answer: Literal["json", "png"] = Query("json", alias="format",
                                                   description="json: the saliency and the overlay in base64; "
                                                               "png: the overlay image alone")):
        """Grad-CAM of the served model for one image (multipart `file` or JSON `image_b64`, as /v1/predict):
        where in the image the evidence for `target` lies, as an HxW map in [0, 1] and an overlay PNG."""
        [data] = await read_images(request, limits, "file", many=False)
        try:
            result = await ctx.backend.explain(data, target or None)
        except images.ImageRejected as exc:
            raise rejected(exc) from None
        if "unsupported" in result:
            raise HTTPException(409, result["unsupported"])
        if "unknown_target" in result:
            raise HTTPException(422, result["unknown_target"])
        if answer == "png":
            return Response(result["overlay_png"], media_type="image/png", headers={
                "X-Label": quote(result["label"]), "X-Target": quote(result["target"]),
                "X-Model-Version": quote(str(result["model_version"]))})
        return schemas.Explanation(overlay_png_b64=base64.b64encode(result["overlay_png"]).decode(),
                                   **{k: result[k] for k in ANSWERED})

    return api
