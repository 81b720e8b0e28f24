# A Rack app for puma under `switcheroo run --notify-replaced WINCH`: once the instance is
# replaced, every response closes its connection (puma decides keep-alive from the
# request's Connection header, which this middleware sets), so keep-alive clients move to
# the new instance before puma's graceful stop closes whatever is idle.
replaced = false
Signal.trap("WINCH") { replaced = true }
app = ->(env) { [200, { "content-type" => "text/plain" }, ["hello from pid #{Process.pid}"]] }
run ->(env) {
  env["HTTP_CONNECTION"] = "close" if replaced
  app.call(env)
}
