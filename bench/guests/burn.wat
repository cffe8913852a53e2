;; burn.wat — counts down from 5·10^6, then prints a valid response.
;;
;; Why: the CPU-bound guest of the benchmarks (the noisy neighbour, and fuel and epoch on
;; against off). tests/guests/fuel_burn.wat with 200× fewer iterations: about 4.5 ms of CPU
;; and 3·10^7 fuel, well inside the default fuel_per_request and timeout_ms.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          burned
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (global $ITERATIONS i32 (i32.const 5_000_000))

  (data (i32.const 16) "content-type: text/plain\n\nburned\n")  ;; 33 bytes

  (func (export "_start")
    (local $left i32)
    (local.set $left (global.get $ITERATIONS))
    (loop $burn
      (local.set $left (i32.sub (local.get $left) (i32.const 1)))
      (br_if $burn (local.get $left)))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 33))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
