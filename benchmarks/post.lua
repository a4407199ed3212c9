-- wrk script: every request is a POST with a 64 KiB body (the upstream's /post answers 1 MiB).
wrk.method = "POST"
wrk.body = string.rep("x", 64 * 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
