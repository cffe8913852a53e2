-- wrk script: each connection waits 2 ms after a response before its next request, so the
-- quiet tenant of the noisy-neighbour benchmark sends light, paced traffic (<= 500 req/s per
-- connection) instead of saturating the cores itself.
function delay()
  return 2
end
