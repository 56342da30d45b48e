"""`POST /v1/feedback`: thumbs, star ratings and pairwise picks, stored once per idempotency key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response

from serving import feedback_store as fs
from serving.api.body import StrictJSONRoute
from serving.api.dependencies import Limits, Store, StoreSession, require_feedback_client
from serving.api.errors import APIError
from serving.api.schemas import FeedbackReceipt, FeedbackRequest, RatingFeedback, ThumbsFeedback

router = APIRouter(prefix="/v1", dependencies=[Depends(require_feedback_client)], route_class=StrictJSONRoute)


def feedback_input(body: FeedbackRequest, idempotency_key: str | None) -> fs.FeedbackInput:
    """The store's row from the request body (thumbs up/down -> +1/-1, stars -> 1..5)."""
    common = {
        "comment": body.comment,
        "corrected_response": body.corrected_response,
        "idempotency_key": body.idempotency_key or idempotency_key,
    }
    if isinstance(body, ThumbsFeedback):
        return fs.FeedbackInput("thumbs", body.completion_id, value=1 if body.value == "up" else -1, **common)
    if isinstance(body, RatingFeedback):
        return fs.FeedbackInput("rating", body.completion_id, value=body.stars, **common)
    return fs.FeedbackInput("pairwise", body.chosen_id, rejected_id=body.rejected_id, **common)


@router.post("/feedback", response_model=FeedbackReceipt, status_code=201)
def post_feedback(
    body: FeedbackRequest,
    response: Response,
    store: Store,
    session: StoreSession,
    limits: Limits,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> FeedbackReceipt:
    if body.comment and len(body.comment) > limits.max_comment_chars:
        raise APIError(400, f"comment: at most {limits.max_comment_chars} characters", param="comment")
    try:
        with store.write_lock:
            row, created = fs.add_feedback(session, feedback_input(body, idempotency_key))
    except fs.FeedbackError as exc:
        raise APIError(exc.status, str(exc), param=exc.param) from None
    if not created:
        response.status_code = 200  # a replay of an acknowledged key: the original receipt
    return FeedbackReceipt(
        id=row.id,
        type=row.kind,
        completion_id=row.completion_id,
        rejected_id=row.rejected_id,
        duplicate=not created,
    )
