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

-- With env WINDOW=W, each thread also counts the 200 answers that arrive in W whole seconds of the clock, from the
-- SKIP-th (default 3) clock second after it starts, so 2-3 s into the run: a steady-state rate, without the first
-- second in which no slow request can have finished yet, nor the requests still in flight when the run stops.
local threads = {}
function setup(thread) table.insert(threads, thread) end
local window = tonumber(os.getenv("WINDOW") or "")
if window then
  local from, upto
  steady = 0
  function init(args)
    from = os.time() + (tonumber(os.getenv("SKIP") or "") or 3)
    upto = from + window
  end
  function response(status, headers, body)
    local now = os.time()
    if status == 200 and now >= from and now < upto then steady = steady + 1 end
  end
end

function done(summary, latency, requests)
  local steady = 0
  for _, thread in ipairs(threads) do steady = steady + (thread:get("steady") or 0) end
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.3f, "p50_us": %d, "p99_us": %d, "non_2xx": %d, "errors": %d, ' ..
    '"steady": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout, steady))
end
