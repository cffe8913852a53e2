;; routes_flood.wat — `_routes` prints 100 KiB: 100 lines of 1,024 bytes.
;;
;; Why: over the default max_routes_output_bytes (64 KiB), with only 100 routes
;; (under every route count), so only the output bound can refuse it.
;;
;; Output of _routes:  "/aaa…a h\n" (1,024 bytes: "/", 1,020 "a", " h\n") 100 times
;; Output of _start, h: content-type: text/plain, blank line, "flood\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 64.. the response;
;;          1024..2047 the line, built by _routes.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 64) "content-type: text/plain\n\nflood\n")   ;; 32 bytes
  (data (i32.const 2045) " h\n")

  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_routes")
    (local $left i32)
    (i32.store8 (i32.const 1024) (i32.const 47))                      ;; "/"
    (memory.fill (i32.const 1025) (i32.const 97) (i32.const 1020))   ;; "a" x 1020
    (local.set $left (i32.const 100))
    (loop $again
      (call $print (i32.const 1024) (i32.const 1024))
      (local.set $left (i32.sub (local.get $left) (i32.const 1)))
      (br_if $again (local.get $left))))

  (func (export "_start")
    (call $print (i32.const 64) (i32.const 32)))

  (func (export "h")
    (call $print (i32.const 64) (i32.const 32))))
