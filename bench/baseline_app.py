"""The benchmark's baseline: a bare Flask app that parses a JSON POST and answers a small
JSON envelope. No auth, no database: what any Flask JSON endpoint costs under gunicorn."""

from datetime import UTC, datetime

from flask import Flask, jsonify, request


def create_app():
    app = Flask(__name__)

    @app.post("/echo")
    def echo():
        body = request.get_json()
        data = {"processStepId": body.get("processStepId")}
        timestamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return jsonify({"message": "OK", "timestamp": timestamp, "data": data, "version": "1.0.0"})

    return app
