# One app for gunicorn (WSGI: `app`) and uvicorn (ASGI: `asgi`): every answer says which
# process gave it (the one switcheroo started) and its internal port.
import os
import signal

BODY = "hello from pid {} port {}"

# `switcheroo run --notify-replaced USR1` sends SIGUSR1 as soon as this instance is
# replaced, before the drain and SIGTERM: from then on every response closes its
# connection, so keep-alive clients move to the new instance before the server closes
# idle connections on SIGTERM (which would race a request sent at that moment).
replaced = False


def _on_replaced(signum, frame):
    global replaced
    replaced = True


if os.environ.get("SWITCHEROO_REPLACED_SIGNAL"):
    signal.signal(getattr(signal, os.environ["SWITCHEROO_REPLACED_SIGNAL"]), _on_replaced)


def app(environ, start_response):
    # gunicorn: the master's pid.
    body = BODY.format(os.getppid(), os.environ["SWITCHEROO_PORT"]).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    body = BODY.format(os.getpid(), os.environ["SWITCHEROO_PORT"]).encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    if replaced:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
