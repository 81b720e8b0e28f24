# gunicorn's side of `switcheroo run --notify-replaced USR1`: once the instance is
# replaced, every response says `Connection: close`, so keep-alive clients move to the
# new instance before SIGTERM makes the workers close their idle connections.
#
# gunicorn ignores a Connection header set by the application, but a request marked
# must_close makes the worker answer with `Connection: close` and close. The master
# forwards USR1 to the workers; this handler replaces the worker's own (log reopening),
# which gunicorn installs before post_worker_init.
import os
import signal

replaced = False


def post_worker_init(worker):
    name = os.environ.get("SWITCHEROO_REPLACED_SIGNAL")
    if not name:
        return

    def on_replaced(signum, frame):
        global replaced
        replaced = True

    signal.signal(getattr(signal, name), on_replaced)


def pre_request(worker, req):
    if replaced:
        req.must_close = True
