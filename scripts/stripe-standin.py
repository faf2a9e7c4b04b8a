#!/usr/bin/env python3
"""Stripe stand-in for the tests: localstripe (PyPI, pinned 1.15.10) plus a TEST DOUBLE of
what localstripe lacks.

Real localstripe serves customers, products, plans and subscriptions. Added here, clearly
a test double and never shipped:

- Billing meters and meter events (`/v1/billing/meters[/{id}]`, `/v1/billing/meter_events`), with
  Stripe's documented rules: the event name must belong to a meter, the payload names an
  existing customer and a whole-number value, the timestamp lies within the past 35 days or
  up to 5 minutes ahead, and an identifier is accepted once (a repeat gets 400
  `resource_already_exists`; the exact code real Stripe uses is our assumption).
- Idempotency keys on every POST, as Stripe keeps them: a repeated key with the same parameters
  replays the first answer, whatever its status; with other parameters it is a 400
  `idempotency_error`. Stripe forgets keys after 24 hours; `POST /_config/test/forget_keys`
  does that at once.
- Meter event summaries (`/v1/billing/meters/{id}/event_summaries`): the sum of a
  customer's accepted event values in `[start_time, end_time)`, or with
  `value_grouping_window=day` one summary per UTC day of it, newest first, `limit` at a time.
- Fault injection, for tests: `POST /_config/test/faults` with JSON `{"path", "status"?,
  "count", "retry_after"?, "delay"?, "after"?, "method"?}` answers the next `count` requests to `path`
  (of `method` only, when given)
  with `status` (and `Retry-After`), after `delay` seconds; with `"after": true` the request
  is carried out first and its answer replaced or delayed, as when a response is lost or
  slow on the way back.
- Invoices and invoice items as Stripe's current API has them (localstripe's own sweep every
  pending item into a new invoice, drop metadata, cannot finalize and default to eur):
  `POST /v1/invoices` makes a draft (currency usd by default; pending items are never swept
  in, as with `pending_invoice_items_behavior=exclude`), `POST /v1/invoiceitems` with
  `invoice` appends a line to that draft (the invoice must be the customer's and a draft,
  else 400 `invoice_not_editable`), `GET /v1/invoices[/{id}[/lines]]`, `GET
  /v1/invoiceitems[/{id}]`, and `POST /v1/invoices/{id}/finalize|void|mark_uncollectible`.
  Totals are the sum of the lines; finalizing makes an invoice `open` (`paid` at once when its
  total is not above zero). These paths are served here for ids the double made; ids and paths
  of localstripe's own invoices (those of its subscriptions, `/upcoming`) still go to it.
  `POST /_config/test/invoices/{id}/pay` and `.../fail_payment` stand for a successful or
  failed attempt of Stripe's own (automatic collection, retries), and `GET
  /_config/test/invoices` lists every invoice.
- Paying an invoice, `POST /v1/invoices/{id}/pay`, charged to the customer's card as the
  double sees it: `POST /_config/test/customers/{id}/card` with JSON `{"outcome": "succeed"}`
  or `{"outcome": "decline", "decline_code"?}` (default `generic_decline`, Stripe's code for a
  decline without a reason) stands for the customer changing its default card (every
  customer's card succeeds until then, a customer without any card included; a
  default payment method or source that localstripe's own rules decline, such as
  `pm_card_chargeCustomerFail`, declines with `generic_decline` unless the control was used
  after it became the default). As Stripe: only an `open` or `uncollectible` invoice can be
  paid; each attempt counts in `attempt_count` and sets `attempted`; success settles the
  invoice (200, the invoice); a decline leaves its status and `next_payment_attempt` as they
  were (a manual attempt schedules no retry) and answers 402 `card_error` with the code,
  decline code and message Stripe gives for that decline code.
- Invoice webhooks, signed as localstripe signs its own (`Stripe-Signature: t=...,v1=` an
  HMAC-SHA256 of `t.body` with each endpoint's secret, body in localstripe's JSON layout) and
  sent to the endpoints `POST /_config/webhooks/{id}` configured: `invoice.finalized`,
  `invoice.voided`, `invoice.marked_uncollectible`, `invoice.payment_failed` (a declined pay,
  `.../fail_payment`), `invoice.payment_succeeded` then `invoice.paid` (a successful pay,
  `.../pay`, an invoice finalized with nothing to collect). An event is `{"id": "evt_...",
  "object": "event", "api_version": "2025-03-31.basil", "created", "type", "livemode",
  "pending_webhooks", "request": {"id", "idempotency_key"}, "data": {"object": <the invoice
  as GET /v1/invoices/{id} showed it then>}}`, kept in localstripe's store (`GET
  /v1/events`). Delivery starts once the answer to the request that made the event has been
  written (the receiver may wait for something the caller holds until it has that answer;
  under an `after` fault, once the request was carried out), the events of one invoice one
  after the other in the order they were made, each once: a delivery that fails, gets no
  2xx or no answer within 30 seconds is not retried, as localstripe does. `GET
  /_config/test/webhooks_sent` lists every event made, in order, as `{"id", "type",
  "invoice", "status", "delivery", "deliveries"}`: `status` is the endpoint's HTTP status
  (null until delivered, or when it did not answer; with several endpoints, that of the last
  one that failed, else of the last), `delivery` one of `pending`, `sent`, `failed` (an
  endpoint answered other than 2xx or not at all), `no_endpoint`; `deliveries` has each
  endpoint's `webhook`, `url`, `status` and `error`.
  Where the double differs from Stripe: no `invoice.created`, `invoice.updated`, charge or
  payment intent events, and no `charge`, `payment_intent` or `payment_method` in a card
  error; a paid invoice's pay is refused with Stripe's message "Invoice is already paid" under
  the code `invoice_not_editable` (Stripe's list of error codes has none for it; which it
  sends is our assumption), a draft's with `invoice_not_editable` (Stripe may finalize a
  draft first; our code always finalizes explicitly); `payment_method`, `source`,
  `paid_out_of_band`, `forgive` and `mandate` of /pay are refused; Stripe retries a failed
  delivery for days and does not keep events in order; the signature's `t` is the event's
  `created`, as localstripe signs (Stripe's is the time of sending: the same unless a
  delivery waits behind a slow one).
- Inspection: `GET /_config/test/meter_events`, `GET /_config/test/requests` (method, path, idempotency
  key, status and arrival time of every API request).

Each process keeps its state in memory only (localstripe's pickle file is disabled), so
tests run their own stand-in side by side. It listens on loopback only.

Usage: stripe-standin.py [--port PORT]   (0 = any free port; prints "listening on HOST:PORT")
"""

import argparse
import asyncio
import contextvars
import hashlib
import hmac
import json
import re
import sys
import time
import urllib.parse

import aiohttp
from aiohttp import web

import localstripe.resources as resources
import localstripe.webhooks as localstripe_webhooks
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
invoices = {}  # id -> invoice without its lines and amounts (see export_invoice), oldest first
invoice_lines = {}  # invoice id -> its lines, in order
invoice_items = {}  # id -> invoice item, oldest first
cards = {}  # customer id -> its card as the test control set it (see card_decline)
webhooks_sent = []  # one record per invoice event, in the order they were made
last_delivery = {}  # invoice id -> the task delivering its latest event

API_VERSION = "2025-03-31.basil"
# Ours: a receiver that never answers must not hold up the invoice's later events for long.
DELIVERY_TIMEOUT_SECONDS = 30
# The events a request made and their request's Stripe `request` field (see answer_first).
request_scope = contextvars.ContextVar("request_scope", default=None)


def stripe_error(status, code, message, kind="invalid_request_error", param=None):
    error = {"type": kind, "message": message}
    if code is not None:
        error["code"] = code
    if param is not None:
        error["param"] = param
    return web.json_response({"error": error}, status=status)


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

    fault = next((f for f in faults if f["path"] == request.path and f["count"] > 0
                  and f.get("method") in (None, request.method)), None)
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
        # The request was carried out: Stripe sends its webhooks whatever becomes of the
        # answer on its way back.
        release_events()
        await asyncio.sleep(fault.get("delay", 0))
        if "status" in fault:
            entry["status"] = fault["status"]
            return injected(fault)
    entry["status"] = status
    return response


@web.middleware
async def answer_first(request, handler):
    """The outermost middleware: the webhooks a request made go out only once its answer has
    been written, so a receiver that waits for something the caller holds until it has the
    answer (a database lock, say) cannot stall either of them."""
    scope = {"made": [], "request": {"id": None, "idempotency_key": None}}
    if request.path.startswith("/v1/"):
        scope["request"] = {"id": "req_" + resources.random_id(14),
                            "idempotency_key": request.headers.get("Idempotency-Key")}
    token = request_scope.set(scope)
    try:
        response = await handler(request)
        if scope["made"]:
            try:
                # aiohttp sends a response only after the handler returns; sent here, it is
                # not sent twice (prepare and write_eof do nothing the second time).
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                pass  # the caller left; the events go all the same
        return response
    finally:
        release_events()
        request_scope.reset(token)


def release_events():
    scope = request_scope.get()
    for released in scope["made"] if scope else ():
        if not released.done():
            released.set_result(None)


class Snapshot:
    """What localstripe's Event takes as its object: anything with an `_export`."""

    def __init__(self, exported):
        self.exported = exported

    def _export(self):
        return self.exported


def invoice_event(event_type, invoice):
    """Makes an event of one of our invoices, as it is now, and schedules its delivery."""
    endpoints = [w for w in localstripe_webhooks._webhooks.values()
                 if w.events is None or event_type in w.events]
    # localstripe's Event keeps it in its store (GET /v1/events); the fields it gives in its
    # 2017 shape are brought to Stripe's current one.
    event = resources.Event(event_type, Snapshot(export_invoice(invoice)))
    event.api_version = API_VERSION
    event.pending_webhooks = len(endpoints)
    scope = request_scope.get()
    # Test controls stand for Stripe's own doings, which come from no API request.
    event.request = dict(scope["request"]) if scope else {"id": None, "idempotency_key": None}
    record = {"id": event.id, "type": event_type, "invoice": invoice["id"], "status": None,
              "delivery": "pending", "deliveries": []}
    webhooks_sent.append(record)
    released = asyncio.get_running_loop().create_future()
    if scope is None:
        released.set_result(None)
    else:
        scope["made"].append(released)
    previous = last_delivery.get(invoice["id"])
    last_delivery[invoice["id"]] = asyncio.ensure_future(
        deliver(event, record, released, previous))


async def deliver(event, record, released, previous):
    """Sends one event to every endpoint, once, after the answer of its request and after the
    invoice's earlier events; signed as localstripe's webhooks.py signs its own."""
    await released
    if previous is not None:
        await asyncio.wait([previous])
    endpoints = [(webhook_id, w) for webhook_id, w in localstripe_webhooks._webhooks.items()
                 if w.events is None or event.type in w.events]
    if not endpoints:
        record["delivery"] = "no_endpoint"
        return
    payload = json.dumps(event._export(), indent=2, sort_keys=True).encode("utf-8")
    signed_payload = b"%d.%s" % (event.created, payload)
    timeout = aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_SECONDS)
    for webhook_id, webhook in endpoints:
        signature = hmac.new(webhook.secret.encode("utf-8"), signed_payload,
                             hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json; charset=utf-8",
                   "Stripe-Signature": "t=%d,v1=%s" % (event.created, signature)}
        delivery = {"webhook": webhook_id, "url": webhook.url, "status": None}
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(webhook.url, data=payload, headers=headers) as r:
                    delivery["status"] = r.status
        except Exception as e:  # whatever goes wrong, it is this delivery's failure alone
            delivery["error"] = str(e) or type(e).__name__
        record["deliveries"].append(delivery)
    failed = [d for d in record["deliveries"] if not 200 <= (d["status"] or 0) < 300]
    record["status"] = (failed or record["deliveries"])[-1]["status"]
    record["delivery"] = "failed" if failed else "sent"


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


async def retrieve_meter(request):
    meter = meters.get(request.match_info["id"])
    if meter is None:
        return stripe_error(404, "resource_missing", "No such billing meter")
    return web.json_response(meter)


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
    # value_grouping_window=day: one summary per UTC day of the window, which must start and
    # end at UTC midnights, newest first, as Stripe lists them (up to `limit`, default 10).
    grouping = request.query.get("value_grouping_window")
    if grouping not in (None, "day"):
        return stripe_error(400, "parameter_invalid", "value_grouping_window: only day is supported here")
    if grouping == "day" and (start % 86400 or end % 86400):
        return stripe_error(400, "parameter_invalid",
                            "start_time and end_time must align with UTC day boundaries")
    windows = [(s, min(s + 86400, end)) for s in range(start, end, 86400)] if grouping else [(start, end)]
    summaries = []
    for low, high in reversed(windows):
        total = sum(
            int(e["payload"]["value"])
            for e in meter_events
            if e["event_name"] == meter["event_name"]
            and e["payload"].get(meter["customer_mapping"]["event_payload_key"]) == customer
            and low <= e["timestamp"] < high
        )
        summaries.append({
            "id": f"mtrusg_{meter['id']}_{customer}_{low}",
            "object": "billing.meter_event_summary",
            "aggregated_value": total,
            "start_time": low,
            "end_time": high,
            "livemode": False,
            "meter": meter["id"],
        })
    # As Stripe: a limit that is not an integer from 1 to 100 is a 400, never a 500.
    try:
        limit = int(request.query.get("limit", 10))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        return stripe_error(400, "parameter_invalid_integer",
                            "Invalid integer: limit must be between 1 and 100.", param="limit")
    return web.json_response(
        {"object": "list", "url": request.path, "has_more": len(summaries) > limit,
         "data": summaries[:limit]}
    )


class StripeError(Exception):
    """An error answer from the invoice routes below."""

    def __init__(self, status, code, message, param=None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def response(self):
        return stripe_error(self.status, self.code, self.message, param=self.param)


def answering_errors(route):
    async def answer(request, **match):
        try:
            return await route(request, **match)
        except StripeError as e:
            return e.response()
    return answer


def existing_customer(data):
    customer = data.get("customer")
    if not customer:
        raise StripeError(400, "parameter_missing", "Missing required param: customer.", "customer")
    try:
        resources.Customer._api_retrieve(customer)
    except Exception:
        # Stripe answers 400 (not 404) for a missing object named in the parameters.
        raise StripeError(400, "resource_missing", f"No such customer: '{customer}'",
                          "customer") from None
    return customer


def whole_number(data, name, default=None):
    value = data.get(name, default)
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    raise StripeError(400, "parameter_invalid_integer", f"Invalid integer: {value}", name)


def boolean(data, name, default):
    value = data.get(name, default)
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise StripeError(400, None, f"Invalid boolean: {value}", name)


def one_of(data, name, default, allowed):
    value = data.get(name, default)
    if value not in allowed:
        raise StripeError(400, None, f"Invalid {name}: must be one of {', '.join(allowed)}", name)
    return value


def metadata_of(data):
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise StripeError(400, None, "Invalid object", "metadata")
    return {str(k): str(v) for k, v in metadata.items()}


def currency_of(data):
    currency = data.get("currency") or "usd"
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{3}", currency):
        raise StripeError(400, None, f"Invalid currency: {currency}", "currency")
    return currency.lower()


def stored_invoice(invoice_id):
    invoice = invoices.get(invoice_id)
    if invoice is None:
        raise StripeError(404, "resource_missing", f"No such invoice: '{invoice_id}'", "id")
    return invoice


def page(items, query, url):
    """One page of a Stripe list: `limit` (1 to 100, default 10) after `starting_after`."""
    limit = whole_number(query, "limit", 10)
    if not 1 <= limit <= 100:
        raise StripeError(400, None, "limit must be between 1 and 100", "limit")
    start = 0
    after = query.get("starting_after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise StripeError(400, "resource_missing", f"No such object: '{after}'",
                              "starting_after")
        start = ids.index(after) + 1
    return {"object": "list", "data": items[start:start + limit],
            "has_more": len(items) > start + limit, "url": url}


def export_invoice(invoice):
    """The invoice as Stripe shows it: amounts from its current lines, the first 10 lines
    (Stripe's page size; `/lines` pages through the rest)."""
    lines = invoice_lines[invoice["id"]]
    total = sum(line["amount"] for line in lines)
    amount_due = max(total, 0)
    exported = dict(invoice)
    exported.update(
        total=total,
        subtotal=total,
        amount_due=amount_due,
        amount_remaining=amount_due - invoice["amount_paid"],
        status_transitions=dict(invoice["status_transitions"]),
        metadata=dict(invoice["metadata"]),
        lines=page(lines, {}, f"/v1/invoices/{invoice['id']}/lines"),
    )
    # Keep Stripe's field order for people reading the JSON.
    order = ["id", "object", "customer", "currency", "description", "metadata", "status",
             "auto_advance", "collection_method", "total", "subtotal", "amount_due",
             "amount_paid", "amount_remaining"]
    exported = {**{k: exported[k] for k in order}, **exported}
    return {k: v for k, v in exported.items() if not k.startswith("_")}


async def create_invoice(request):
    data = await get_post_data(request) or {}
    customer = existing_customer(data)
    collection_method = one_of(data, "collection_method", "charge_automatically",
                               ("charge_automatically", "send_invoice"))
    one_of(data, "pending_invoice_items_behavior", "exclude", ("exclude", "include"))
    days_until_due = whole_number(data, "days_until_due")
    if days_until_due is not None and collection_method != "send_invoice":
        raise StripeError(400, None, "days_until_due can only be set when collection_method "
                          "is send_invoice", "days_until_due")
    if days_until_due is not None and days_until_due < 0:
        raise StripeError(400, None, "days_until_due must not be negative", "days_until_due")
    invoice_id = "in_test_" + resources.random_id(14)
    invoices[invoice_id] = {
        "id": invoice_id,
        "object": "invoice",
        "customer": customer,
        "currency": currency_of(data),
        "description": data.get("description") or None,
        "metadata": metadata_of(data),
        "status": "draft",
        # Stripe leaves invoices made through the API alone unless told otherwise.
        "auto_advance": boolean(data, "auto_advance", False),
        "collection_method": collection_method,
        "amount_paid": 0,
        "attempt_count": 0,
        "attempted": False,
        "billing_reason": "manual",
        "due_date": None,
        "number": None,
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "next_payment_attempt": None,
        "created": int(time.time()),
        "status_transitions": {"finalized_at": None, "paid_at": None, "voided_at": None,
                               "marked_uncollectible_at": None},
        "parent": None,
        "livemode": False,
        "_days_until_due": days_until_due,
    }
    invoice_lines[invoice_id] = []
    return web.json_response(export_invoice(invoices[invoice_id]))


async def retrieve_invoice(request, id):
    return web.json_response(export_invoice(stored_invoice(id)))


async def list_invoices(request):
    newest_first = [export_invoice(i) for i in reversed(invoices.values())
                    if request.query.get("customer") in (None, i["customer"])
                    and request.query.get("status") in (None, i["status"])]
    return web.json_response(page(newest_first, request.query, "/v1/invoices"))


async def list_invoice_lines(request, id):
    stored_invoice(id)
    return web.json_response(page(invoice_lines[id], request.query, f"/v1/invoices/{id}/lines"))


async def finalize_invoice(request, id):
    invoice = stored_invoice(id)
    if invoice["status"] != "draft":
        raise StripeError(400, "invoice_not_editable", "This invoice is already finalized, "
                          "you can't re-finalize a non-draft invoice.")
    now = int(time.time())
    total = sum(line["amount"] for line in invoice_lines[id])
    same_customer = [i for i in invoices.values()
                     if i["customer"] == invoice["customer"] and i["number"]]
    invoice.update(
        status="open",
        number=f"{invoice['customer'][-8:].upper()}-{len(same_customer) + 1:04d}",
        hosted_invoice_url=f"https://invoice.stripe.com/i/test_{id}",
        invoice_pdf=f"https://pay.stripe.com/invoice/test_{id}/pdf",
    )
    invoice["status_transitions"]["finalized_at"] = now
    if invoice["collection_method"] == "send_invoice":
        invoice["due_date"] = now + 86400 * (invoice["_days_until_due"] or 30)
    if total <= 0:
        # Nothing to collect: Stripe marks it paid (a credit goes to the customer's balance).
        settle(invoice, now)
    elif invoice["collection_method"] == "charge_automatically" and invoice["auto_advance"]:
        invoice["next_payment_attempt"] = max(invoice["created"] + 3600, now)
    invoice_event("invoice.finalized", invoice)
    if invoice["status"] == "paid":
        paid_events(invoice)
    return web.json_response(export_invoice(invoice))


def settle(invoice, now):
    invoice.update(status="paid", amount_paid=export_invoice(invoice)["amount_due"],
                   next_payment_attempt=None, auto_advance=False)
    invoice["status_transitions"]["paid_at"] = now


def paid_events(invoice):
    # Stripe sends both for a payment, even of nothing (a $0 invoice).
    invoice_event("invoice.payment_succeeded", invoice)
    invoice_event("invoice.paid", invoice)


async def void_invoice(request, id):
    invoice = stored_invoice(id)
    if invoice["status"] not in ("open", "uncollectible"):
        raise StripeError(400, "invoice_not_editable",
                          f"You can only void open or uncollectible invoices; this one is "
                          f"{invoice['status']}.")
    invoice.update(status="void", next_payment_attempt=None, auto_advance=False)
    invoice["status_transitions"]["voided_at"] = int(time.time())
    invoice_event("invoice.voided", invoice)
    return web.json_response(export_invoice(invoice))


async def mark_invoice_uncollectible(request, id):
    invoice = stored_invoice(id)
    if invoice["status"] != "open":
        raise StripeError(400, "invoice_not_editable", f"You can only mark open invoices "
                          f"uncollectible; this one is {invoice['status']}.")
    invoice.update(status="uncollectible", next_payment_attempt=None, auto_advance=False)
    invoice["status_transitions"]["marked_uncollectible_at"] = int(time.time())
    invoice_event("invoice.marked_uncollectible", invoice)
    return web.json_response(export_invoice(invoice))


async def create_invoice_item(request):
    data = await get_post_data(request) or {}
    customer = existing_customer(data)
    amount = whole_number(data, "amount")
    if amount is None:
        raise StripeError(400, "parameter_missing",
                          "Missing required param: amount (the test double takes no price).",
                          "amount")
    currency = currency_of(data)
    invoice = None
    if data.get("invoice"):
        invoice = invoices.get(data["invoice"])
        if invoice is None:
            raise StripeError(400, "resource_missing", f"No such invoice: '{data['invoice']}'",
                              "invoice")
        if invoice["customer"] != customer:
            raise StripeError(400, "invoice_not_editable", f"Invoice {invoice['id']} belongs "
                              f"to another customer than {customer}.", "invoice")
        if invoice["status"] != "draft":
            raise StripeError(400, "invoice_not_editable", f"Invoice {invoice['id']} is no "
                              f"longer editable: it is {invoice['status']}.", "invoice")
        if currency != invoice["currency"]:
            raise StripeError(400, None, f"The currency of the invoice item ({currency}) must "
                              f"match the invoice's ({invoice['currency']}).", "currency")
    now = int(time.time())
    period = data.get("period") or {}
    if not isinstance(period, dict):
        raise StripeError(400, None, "Invalid object", "period")
    period = {"start": whole_number(period, "start", now), "end": whole_number(period, "end", now)}
    if period["end"] < period["start"]:
        raise StripeError(400, None, "period[end] must not be before period[start]", "period")
    item_id = "ii_test_" + resources.random_id(14)
    item = {
        "id": item_id,
        "object": "invoiceitem",
        "amount": amount,
        "currency": currency,
        "customer": customer,
        "date": now,
        "description": data.get("description") or None,
        "invoice": invoice["id"] if invoice else None,
        "livemode": False,
        "metadata": metadata_of(data),
        "period": period,
        "proration": False,
        "quantity": 1,
    }
    invoice_items[item_id] = item
    if invoice is not None:
        invoice_lines[invoice["id"]].append({
            "id": "il_test_" + resources.random_id(14),
            "object": "line_item",
            "amount": amount,
            "currency": currency,
            "description": item["description"],
            "invoice": invoice["id"],
            "livemode": False,
            "metadata": dict(item["metadata"]),
            "parent": {"type": "invoice_item_details",
                       "invoice_item_details": {"invoice_item": item_id}},
            "period": dict(period),
            "quantity": 1,
        })
    return web.json_response(item)


async def retrieve_invoice_item(request, id):
    item = invoice_items.get(id)
    if item is None:
        raise StripeError(404, "resource_missing", f"No such invoiceitem: '{id}'", "id")
    return web.json_response(item)


async def list_invoice_items(request):
    query = request.query
    newest_first = [i for i in reversed(invoice_items.values())
                    if query.get("customer") in (None, i["customer"])
                    and query.get("invoice") in (None, i["invoice"])
                    and (query.get("pending") != "true" or i["invoice"] is None)]
    return web.json_response(page(newest_first, query, "/v1/invoiceitems"))


# decline code -> (error code, message, param) as Stripe answers a card declined for it; any
# other decline code is a `card_declined` "Your card was declined." (Stripe gives no more
# to the payer for lost, stolen or fraudulent cards, or a generic decline).
DECLINES = {
    "insufficient_funds": ("card_declined", "Your card has insufficient funds.", None),
    "expired_card": ("expired_card", "Your card has expired.", "exp_month"),
    "incorrect_cvc": ("incorrect_cvc", "Your card's security code is incorrect.", "cvc"),
    "incorrect_number": ("incorrect_number", "Your card number is incorrect.", "number"),
    "processing_error": ("processing_error", "An error occurred while processing your card. "
                         "Try again in a little bit.", None),
}
# Stripe's own decline code when the bank gives no reason.
GENERIC_DECLINE = "generic_decline"


def default_card(customer_id):
    """localstripe's default payment method or source of the customer, if any."""
    try:
        customer = resources.Customer._api_retrieve(customer_id)
        return customer._get_default_payment_method_or_source()
    except Exception:
        return None  # a deleted customer, a default that no longer exists


def card_decline(customer_id):
    """None when charging the customer's card succeeds, else Stripe's decline code. The test
    control stands for a new default card, so it counts until localstripe's default changes
    after it; then that card does, declined only by localstripe's own rules."""
    card = default_card(customer_id)
    current = card.id if card is not None else None
    chosen = cards.get(customer_id)
    if chosen is not None and chosen["default_then"] == current:
        return chosen["decline_code"]
    try:
        declined = card is not None and card._charging_is_declined()
    except Exception:
        declined = False  # a kind of source localstripe has no rule for
    return GENERIC_DECLINE if declined else None


def card_error(decline_code):
    code, message, param = DECLINES.get(decline_code,
                                        ("card_declined", "Your card was declined.", None))
    error = {"type": "card_error", "code": code, "decline_code": decline_code,
             "message": message,
             "doc_url": "https://stripe.com/docs/error-codes/" + code.replace("_", "-")}
    if param is not None:
        error["param"] = param
    return web.json_response({"error": error}, status=402)


async def pay_invoice(request, id):
    """`POST /v1/invoices/{id}/pay`: one attempt to charge the customer's card now."""
    data = await get_post_data(request) or {}
    for name in ("payment_method", "source", "paid_out_of_band", "forgive", "mandate"):
        if name in data:
            raise StripeError(400, "parameter_unknown", f"The test double does not take "
                              f"{name}: it charges the customer's card as the test control "
                              f"/_config/test/customers/{{id}}/card set it.", name)
    boolean(data, "off_session", True)  # checked as Stripe does; it changes nothing here
    invoice = stored_invoice(id)
    if invoice["status"] == "paid":
        raise StripeError(400, "invoice_not_editable", "Invoice is already paid")
    if invoice["status"] not in ("open", "uncollectible"):
        raise StripeError(400, "invoice_not_editable",
                          f"You can only pay open or uncollectible invoices; this one is "
                          f"{invoice['status']}.")
    invoice.update(attempt_count=invoice["attempt_count"] + 1, attempted=True)
    decline_code = card_decline(invoice["customer"])
    if decline_code is not None:
        # The status stays and no retry is scheduled: Stripe's retries follow its own
        # automatic attempts, not one asked for.
        invoice_event("invoice.payment_failed", invoice)
        return card_error(decline_code)
    settle(invoice, int(time.time()))
    paid_events(invoice)
    return web.json_response(export_invoice(invoice))


# (method, path, localstripe object kind, route). Only `in_`/`ii_` ids match, so localstripe
# keeps `/v1/invoices/upcoming` and the like; ids it made itself go to it as well.
INVOICE_ROUTES = [
    (method, re.compile(path), kind, answering_errors(route))
    for method, path, kind, route in (
        ("POST", r"/v1/invoices", None, create_invoice),
        ("GET", r"/v1/invoices", None, list_invoices),
        ("GET", r"/v1/invoices/(?P<id>in_\w+)", "invoice", retrieve_invoice),
        ("GET", r"/v1/invoices/(?P<id>in_\w+)/lines", "invoice", list_invoice_lines),
        ("POST", r"/v1/invoices/(?P<id>in_\w+)/finalize", "invoice", finalize_invoice),
        ("POST", r"/v1/invoices/(?P<id>in_\w+)/void", "invoice", void_invoice),
        ("POST", r"/v1/invoices/(?P<id>in_\w+)/mark_uncollectible", "invoice",
         mark_invoice_uncollectible),
        ("POST", r"/v1/invoices/(?P<id>in_\w+)/pay", "invoice", pay_invoice),
        ("POST", r"/v1/invoiceitems", None, create_invoice_item),
        ("GET", r"/v1/invoiceitems", None, list_invoice_items),
        ("GET", r"/v1/invoiceitems/(?P<id>ii_\w+)", "invoiceitem", retrieve_invoice_item),
    )
]


@web.middleware
async def invoice_middleware(request, handler):
    """Serves the invoice routes above instead of localstripe. It is the innermost middleware,
    so localstripe's authentication and the fault injection, idempotency keys and request log
    of `test_double_middleware` apply to these routes as to any other."""
    for method, path, kind, route in INVOICE_ROUTES:
        match = path.fullmatch(request.path)
        if match is None or request.method != method:
            continue
        object_id = match.groupdict().get("id")
        ours = invoice_items if kind == "invoiceitem" else invoices
        if object_id and object_id not in ours and f"{kind}:{object_id}" in resources.store:
            break  # one of localstripe's own (a subscription's invoice)
        return await route(request, **match.groupdict())
    return await handler(request)


async def succeed_invoice_payment(request, id):
    """Test control: a successful payment attempt of Stripe's own."""
    invoice = stored_invoice(id)
    if invoice["status"] not in ("open", "uncollectible"):
        raise StripeError(400, "invoice_not_editable",
                          f"Only an open or uncollectible invoice can be paid; this one is "
                          f"{invoice['status']}.")
    invoice.update(attempt_count=invoice["attempt_count"] + 1, attempted=True)
    settle(invoice, int(time.time()))
    paid_events(invoice)
    return web.json_response(export_invoice(invoice))


async def fail_invoice_payment(request, id):
    """Test control: a failed payment attempt; Stripe retries a day later when it collects."""
    invoice = stored_invoice(id)
    if invoice["status"] != "open":
        raise StripeError(400, "invoice_not_editable", f"Only an open invoice can fail a "
                          f"payment; this one is {invoice['status']}.")
    invoice.update(attempt_count=invoice["attempt_count"] + 1, attempted=True)
    if invoice["collection_method"] == "charge_automatically" and invoice["auto_advance"]:
        now = int(time.time())
        invoice["next_payment_attempt"] = max(invoice["next_payment_attempt"] or now, now) + 86400
    invoice_event("invoice.payment_failed", invoice)
    return web.json_response(export_invoice(invoice))


async def list_all_invoices(request):
    return web.json_response({"data": [export_invoice(i) for i in invoices.values()]})


async def set_card(request):
    """Test control: the customer's default card now succeeds or is declined."""
    customer = request.match_info["id"]
    try:
        resources.Customer._api_retrieve(customer)
    except Exception:
        return stripe_error(404, "resource_missing", f"No such customer: '{customer}'", param="id")
    try:
        data = await request.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("outcome") not in ("succeed", "decline"):
        return stripe_error(400, None, 'outcome must be "succeed" or "decline"', param="outcome")
    decline_code = data.get("decline_code", GENERIC_DECLINE)
    if data["outcome"] == "succeed":
        decline_code = None
    elif not isinstance(decline_code, str) or not decline_code:
        return stripe_error(400, None, "decline_code must be a decline code", param="decline_code")
    card = default_card(customer)
    cards[customer] = {"decline_code": decline_code,
                       "default_then": card.id if card is not None else None}
    return web.json_response({"customer": customer, "outcome": data["outcome"],
                              "decline_code": decline_code})


async def list_webhooks_sent(request):
    return web.json_response({"data": webhooks_sent})


def with_id(route):
    route = answering_errors(route)
    return lambda request: route(request, id=request.match_info["id"])


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
app.middlewares.insert(0, answer_first)
app.middlewares.append(invoice_middleware)
app.router.add_post("/v1/billing/meters", create_meter)
app.router.add_get("/v1/billing/meters", list_meters)
app.router.add_get("/v1/billing/meters/{id}", retrieve_meter)
app.router.add_post("/v1/billing/meter_events", create_meter_event)
app.router.add_get("/v1/billing/meters/{id}/event_summaries", meter_event_summaries)
app.router.add_post("/_config/test/faults", add_fault)
app.router.add_get("/_config/test/meter_events", list_meter_events)
app.router.add_post("/_config/test/forget_keys", forget_keys)
app.router.add_get("/_config/test/requests", list_requests)
app.router.add_post("/_config/test/invoices/{id}/pay", with_id(succeed_invoice_payment))
app.router.add_post("/_config/test/invoices/{id}/fail_payment", with_id(fail_invoice_payment))
app.router.add_get("/_config/test/invoices", list_all_invoices)
app.router.add_post("/_config/test/customers/{id}/card", set_card)
app.router.add_get("/_config/test/webhooks_sent", list_webhooks_sent)


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
