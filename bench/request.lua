-- wrk script: POST the JSON body in env BODY (or a multipart edit of the file in env UPLOAD) with env KEY,
-- and print a JSON summary line at the end.
local key = os.getenv("KEY")
local upload = os.getenv("UPLOAD")
wrk.method = os.getenv("METHOD") or "POST"
if key then wrk.headers["Authorization"] = "Bearer " .. key end
if upload then
  local f = assert(io.open(upload, "rb"))
  local data = f:read("*all")
  f:close()
  local b = "openopen8benchboundary"
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. b
  wrk.body = "--" .. b .. "\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n" .. os.getenv("MODEL") ..
    "\r\n--" .. b .. "\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nadd a moon\r\n--" .. b ..
    "\r\nContent-Disposition: form-data; name=\"image\"; filename=\"in.png\"\r\nContent-Type: image/png\r\n\r\n" ..
    data .. "\r\n--" .. b .. "--\r\n"
elseif os.getenv("BODY") then
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = os.getenv("BODY")
end

function done(summary, latency, requests)
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.3f, "p50_us": %d, "p99_us": %d, "non_2xx": %d, "errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout))
end
