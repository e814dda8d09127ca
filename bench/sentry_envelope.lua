-- wrk script (bench/http_ingest.py): a Sentry envelope per request, each
-- event with its own id, one of 1,000 groups (the culprit function differs),
-- a Python exception of 3 frames, user, tags, 5 breadcrumbs, trace context.
local counter = 0
local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  math.randomseed(os.time() + (tid or 0) * 7919)
end

local function hex(n, width)
  return string.format("%0" .. width .. "x", n)
end

request = function()
  counter = counter + 1
  local id = hex(tid or 0, 8) .. hex(counter, 8) .. hex(math.random(0, 2147483647), 8) .. hex(math.random(0, 2147483647), 8)
  local g = math.random(1, 1000)
  local payload = '{"event_id":"' .. id .. '","platform":"python","level":"error","release":"shop@1.4.2",'
    .. '"environment":"production","user":{"id":"u-' .. (counter % 500) .. '"},"tags":{"region":"eu"},'
    .. '"contexts":{"trace":{"trace_id":"' .. id .. '","span_id":"' .. string.sub(id, 1, 16) .. '"}},'
    .. '"breadcrumbs":{"values":[{"message":"step 0","category":"app"},{"message":"step 1","category":"app"},'
    .. '{"message":"step 2","category":"app"},{"message":"step 3","category":"app"},{"message":"step 4","category":"app"}]},'
    .. '"exception":{"values":[{"type":"KeyError","value":"\'cart-' .. counter .. '\'","stacktrace":{"frames":['
    .. '{"filename":"django/core/handlers/base.py","abs_path":"/usr/lib/python3/site-packages/django/core/handlers/base.py","module":"django.core.handlers.base","function":"_get_response","lineno":197,"in_app":false},'
    .. '{"filename":"app/views.py","abs_path":"/srv/app/views.py","module":"app.views","function":"checkout","lineno":42,"in_app":true},'
    .. '{"filename":"app/cart.py","abs_path":"/srv/app/cart.py","module":"app.cart","function":"total_' .. g .. '","lineno":7,"in_app":true}]}}]}}'
  local body = '{"event_id":"' .. id .. '"}\n{"type":"event","length":' .. #payload .. '}\n' .. payload .. '\n'
  return wrk.format("POST", nil, nil, body)
end
