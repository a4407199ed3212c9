-- One request per connection: wrk opens a new connection for each.
wrk.headers["Connection"] = "close"
