"""The response envelope every endpoint answers with: message, timestamp, data, version."""

from flask import jsonify

from schemas import VERSION
from store import now_iso

ERROR_MESSAGES = {
    401: "Unauthorized request",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    412: "Precondition failed",
    413: "Payload too large",
    500: "Internal Server Error",
    503: "Service unavailable",
}


def envelope(data, message="OK", status=200):
    """A JSON response in the envelope."""
    response = jsonify({"message": message, "timestamp": now_iso(), "data": data, "version": VERSION})
    response.status_code = status
    return response


def error(status, data):
    """An error response; the message is fixed by the status code."""
    return envelope(data, ERROR_MESSAGES.get(status, "Error"), status)
