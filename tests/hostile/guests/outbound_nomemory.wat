;; outbound_nomemory.wat — a guest whose memory is not exported as `memory` calls
;; wasi_experimental_http: the host must answer memory_not_found (2). Without a memory
;; it cannot print (WASI needs `memory` too), so it traps (`unreachable`) when the answer
;; is 2 and returns with no output otherwise: the two end in different 500 messages.
(module
  (import "wasi_experimental_http" "close" (func $close (param i32) (result i32)))
  (memory (export "mem") 1)
  (func (export "_start")
    (if (i32.eq (call $close (i32.const 0)) (i32.const 2)) (then unreachable))))
