;; host_calls_write_loop.wat — 1,000 fd_writes of nothing, then a valid response.
;;
;; Why: an fd_write costs the host microseconds however little it writes; the
;; host charges each call to the guest's fuel, so the run's fuel_used exceeds
;; what its few thousand instructions alone would burn.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          wrote
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the response.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (global $CALLS i32 (i32.const 1000))

  (data (i32.const 16) "content-type: text/plain\n\nwrote\n")  ;; 32 bytes

  (func (export "_start")
    (local $left i32)
    (local.set $left (global.get $CALLS))
    (loop $again
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 8)))
      (local.set $left (i32.sub (local.get $left) (i32.const 1)))
      (br_if $again (local.get $left)))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 32))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
