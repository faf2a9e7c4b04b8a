#!/usr/bin/env python3
"""Stripe stand-in for the tests: localstripe (PyPI, pinned 1.15.10) plus a TEST DOUBLE of
what localstripe lacks.

Real localstripe serves customers, products, plans and subscriptions. Added here, clearly
a test double and never shipped:

- Billing meters and meter events (`/v1/billing/meters`, `/v1/billing/meter_events`), with
  Stripe's documented rules: the event name must belong to a meter, the payload names an
  existing customer and a whole-number value, the timestamp lies within the past 35 days or
  up to 5 minutes ahead, and an identifier is accepted once (a repeat gets 400
  `resource_already_exists`; the exact code real Stripe uses is our assumption).
- Idempotency keys on every POST, as Stripe keeps them: a repeated key with the same parameters
  replays the first answer, whatever its status; with other parameters it is a 400
  `idempotency_error`. Stripe forgets keys after 24 hours; `POST /_config/test/forget_keys`
  does that at once.
- Meter event summaries (`/v1/billing/meters/{id}/event_summaries`): the sum of a
  customer's accepted event values in `[start_time, end_time)`.
- Fault injection, for tests: `POST /_config/test/faults` with JSON `{"path", "status"?,
  "count", "retry_after"?, "delay"?, "after"?}` answers the next `count` requests to `path`
  with `status` (and `Retry-After`), after `delay` seconds; with `"after": true` the request
  is carried out first and its answer replaced or delayed, as when a response is lost or
  slow on the way back.
- Inspection: `GET /_config/test/meter_events`, `GET /_config/test/requests` (method, path, idempotency
  key, status and arrival time of every API request).

Each process keeps its state in memory only (localstripe's pickle file is disabled), so
tests run their own stand-in side by side. It listens on loopback only.

Usage: stripe-standin.py [--port PORT]   (0 = any free port; prints "listening on HOST:PORT")
"""

import argparse
import asyncio
import json
import sys
import time
import urllib.parse

from aiohttp import web

import localstripe.resources as resources
from localstripe.server import app, get_post_data

# localstripe saves its whole store to /tmp/localstripe.pickle after every write; parallel
# stand-ins would overwrite each other's state, so this one stays in memory.
resources.Store.dump_to_disk = lambda self: None

MAX_AGE_SECONDS = 35 * 24 * 3600
MAX_AHEAD_SECONDS = 5 * 60

meters = {}  # id -> meter object
meter_events = []  # accepted events, in arrival order
identifiers = set()
idempotent = {}  # (api key, idempotency key) -> (body, status, answer)
faults = []  # pending injected faults
requests_seen = []


def stripe_error(status, code, message, kind="invalid_request_error"):
    return web.json_response(
        {"error": {"type": kind, "code": code, "message": message}}, status=status
    )


@web.middleware
async def test_double_middleware(request, handler):
    """Fault injection, idempotency keys and the request log, around every API call."""
    # localstripe's own authentication lets `/_config/` through without a key, so the test
    # controls below live there; everything under /v1/ is the API.
    if not request.path.startswith("/v1/"):
        return await handler(request)
    # Stripe compares a repeated key's parameters, not their order (ours come from a map).
    body = sorted(urllib.parse.parse_qsl((await request.read()).decode("utf-8", "replace")))
    key = request.headers.get("Idempotency-Key")
    entry = {
        "method": request.method,
        "path": request.path,
        "idempotency_key": key,
        "at": time.time(),
    }
    requests_seen.append(entry)

    fault = next((f for f in faults if f["path"] == request.path and f["count"] > 0), None)
    if fault is not None:
        fault["count"] -= 1
    if fault is not None and not fault.get("after"):
        await asyncio.sleep(fault.get("delay", 0))
        if "status" in fault:
            entry["status"] = fault["status"]
            return injected(fault)

    if request.method == "POST" and key is not None:
        scope = (request.headers.get("Authorization"), key)
        if scope in idempotent:
            first_body, status, answer = idempotent[scope]
            if first_body != body:
                entry["status"] = 400
                return stripe_error(
                    400,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters "
                    "they were first used with.",
                    kind="idempotency_error",
                )
            if fault is not None:
                await asyncio.sleep(fault.get("delay", 0))
                if "status" in fault:
                    entry["status"] = fault["status"]
                    return injected(fault)
            entry["status"] = status
            response = web.Response(
                body=answer, status=status, content_type="application/json"
            )
            response.headers["Idempotent-Replayed"] = "true"
            return response

    response = await handler(request)
    status = response.status
    # Like Stripe, the first result of a key is kept whatever its status, once the request
    # was carried out (an injected fault before it is not).
    if request.method == "POST" and key is not None:
        idempotent[(request.headers.get("Authorization"), key)] = (body, status, response.body)
    if fault is not None and fault.get("after"):
        await asyncio.sleep(fault.get("delay", 0))
        if "status" in fault:
            entry["status"] = fault["status"]
            return injected(fault)
    entry["status"] = status
    return response


def injected(fault):
    response = stripe_error(
        fault["status"],
        "injected_fault",
        "fault injected by the test double",
        kind="api_error" if fault["status"] >= 500 else "invalid_request_error",
    )
    if fault.get("retry_after") is not None:
        response.headers["Retry-After"] = str(fault["retry_after"])
    return response


async def create_meter(request):
    data = await get_post_data(request) or {}
    event_name = data.get("event_name")
    display_name = data.get("display_name")
    aggregation = (data.get("default_aggregation") or {}).get("formula")
    if not event_name or not display_name or aggregation not in ("sum", "count", "last"):
        return stripe_error(400, "parameter_missing", "event_name, display_name and "
                            "default_aggregation[formula] are required")
    if any(m["event_name"] == event_name and m["status"] == "active" for m in meters.values()):
        return stripe_error(400, "resource_already_exists",
                            f"An active meter with event_name {event_name} already exists.")
    meter_id = f"mtr_test_{len(meters) + 1:06d}"
    customer_key = (data.get("customer_mapping") or {}).get("event_payload_key", "stripe_customer_id")
    value_key = (data.get("value_settings") or {}).get("event_payload_key", "value")
    meter = {
        "id": meter_id,
        "object": "billing.meter",
        "created": int(time.time()),
        "display_name": display_name,
        "event_name": event_name,
        "default_aggregation": {"formula": aggregation},
        "customer_mapping": {"type": "by_id", "event_payload_key": customer_key},
        "value_settings": {"event_payload_key": value_key},
        "status": "active",
        "livemode": False,
    }
    meters[meter_id] = meter
    return web.json_response(meter)


async def list_meters(request):
    return web.json_response(
        {"object": "list", "url": "/v1/billing/meters", "has_more": False,
         "data": list(meters.values())}
    )


async def create_meter_event(request):
    data = await get_post_data(request) or {}
    event_name = data.get("event_name")
    payload = data.get("payload") or {}
    meter = next((m for m in meters.values()
                  if m["event_name"] == event_name and m["status"] == "active"), None)
    if meter is None:
        return stripe_error(400, "resource_missing", f"No active meter for event_name {event_name}.")
    customer = payload.get(meter["customer_mapping"]["event_payload_key"])
    try:
        resources.Customer._api_retrieve(customer)
    except Exception:
        return stripe_error(400, "resource_missing", f"No such customer: {customer}")
    value = payload.get(meter["value_settings"]["event_payload_key"])
    if not isinstance(value, str) or not value.lstrip("-").isdigit():
        return stripe_error(400, "parameter_invalid_integer", "payload value must be a whole number")
    now = int(time.time())
    try:
        timestamp = int(data.get("timestamp", now))
    except ValueError:
        return stripe_error(400, "parameter_invalid_integer", "timestamp must be an integer")
    if timestamp < now - MAX_AGE_SECONDS or timestamp > now + MAX_AHEAD_SECONDS:
        return stripe_error(400, "timestamp_out_of_range",
                            "timestamp must be within the past 35 days or 5 minutes ahead")
    identifier = data.get("identifier") or f"auto_{len(meter_events) + 1}"
    if len(identifier) > 100:
        return stripe_error(400, "parameter_invalid_string_length", "identifier over 100 characters")
    if identifier in identifiers:
        return stripe_error(400, "resource_already_exists",
                            f"An event with identifier {identifier} already exists.")
    identifiers.add(identifier)
    event = {
        "object": "billing.meter_event",
        "created": now,
        "event_name": event_name,
        "identifier": identifier,
        "livemode": False,
        "payload": payload,
        "timestamp": timestamp,
    }
    meter_events.append(event)
    return web.json_response(event)


async def meter_event_summaries(request):
    meter = meters.get(request.match_info["id"])
    if meter is None:
        return stripe_error(404, "resource_missing", "No such billing meter")
    try:
        customer = request.query["customer"]
        start, end = int(request.query["start_time"]), int(request.query["end_time"])
    except (KeyError, ValueError):
        return stripe_error(400, "parameter_missing", "customer, start_time and end_time are required")
    total = sum(
        int(e["payload"]["value"])
        for e in meter_events
        if e["event_name"] == meter["event_name"]
        and e["payload"].get(meter["customer_mapping"]["event_payload_key"]) == customer
        and start <= e["timestamp"] < end
    )
    summary = {
        "id": f"mtrusg_{meter['id']}_{customer}_{start}",
        "object": "billing.meter_event_summary",
        "aggregated_value": total,
        "start_time": start,
        "end_time": end,
        "livemode": False,
        "meter": meter["id"],
    }
    return web.json_response(
        {"object": "list", "url": request.path, "has_more": False, "data": [summary]}
    )


async def add_fault(request):
    fault = await request.json()
    if fault.get("status") is None:
        fault.pop("status", None)
    if not isinstance(fault.get("path"), str) or not (
        isinstance(fault.get("status"), int) or isinstance(fault.get("delay"), (int, float))
    ):
        return web.json_response({"error": "path and status or delay are required"}, status=400)
    fault.setdefault("count", 1)
    faults.append(fault)
    return web.json_response(fault)


async def forget_keys(request):
    idempotent.clear()
    return web.json_response({"forgotten": True})


async def list_meter_events(request):
    return web.json_response({"data": meter_events})


async def list_requests(request):
    return web.json_response({"data": requests_seen})


app.middlewares.insert(0, test_double_middleware)
app.router.add_post("/v1/billing/meters", create_meter)
app.router.add_get("/v1/billing/meters", list_meters)
app.router.add_post("/v1/billing/meter_events", create_meter_event)
app.router.add_get("/v1/billing/meters/{id}/event_summaries", meter_event_summaries)
app.router.add_post("/_config/test/faults", add_fault)
app.router.add_get("/_config/test/meter_events", list_meter_events)
app.router.add_post("/_config/test/forget_keys", forget_keys)
app.router.add_get("/_config/test/requests", list_requests)


async def serve(port):
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, bound = runner.addresses[0][:2]
    print(f"listening on {host}:{bound}", flush=True)
    await asyncio.Event().wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
