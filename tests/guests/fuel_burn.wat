;; fuel_burn.wat — counts down from 10^9, then prints a valid response.
;;
;; Why: a guest that is slow but finishes. With a small fuel budget it is cut
;; off (503); with enough fuel and time it answers 200, which shows that the
;; limit and not the guest decided. Measured with wasmtime 50: 6 units of
;; fuel per iteration, 6·10^9 in all, about 0.9 s of CPU.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          burned
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (global $ITERATIONS i32 (i32.const 1_000_000_000))

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
